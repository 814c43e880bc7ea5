"""Command templates and model files of managed engines (apps/engines/launch.py) and
their validation on the models."""

from __future__ import annotations

import sys

import pytest
from django.core.exceptions import ValidationError

from apps.engines.launch import LaunchSpec, render_command, resolve_model_path
from apps.engines.models import Engine, EngineVariant, ServedModel


@pytest.fixture
def models_dir(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    (settings.MODELS_DIR / "sub dir").mkdir(parents=True)
    (settings.MODELS_DIR / "sub dir" / "m.gguf").write_bytes(b"GGUF")
    return settings.MODELS_DIR


def spec(template: str, **overrides) -> LaunchSpec:
    values = {"port": 8081, "slots": 2, "ctx_size": 4096, "model_path": "", "extra_args": ""}
    return LaunchSpec(command_template=template, **{**values, **overrides})


def test_it_renders_every_placeholder(models_dir) -> None:
    argv = render_command(
        spec(
            "{python} srv --host {host} --port {port} -c {ctx_size} -np {slots} "
            "-m {model_path} {extra_args} --alias x{{y}}",
            model_path="sub dir/m.gguf",
            extra_args="--temp 0 --prompt 'a b'",
        )
    )

    assert argv == [
        sys.executable, "srv", "--host", "127.0.0.1", "--port", "8081", "-c", "4096",
        "-np", "2", "-m", str(models_dir / "sub dir" / "m.gguf"),  # one word despite the space
        "--temp", "0", "--prompt", "a b", "--alias", "x{y}",
    ]  # fmt: skip


def test_it_gives_llama_server_the_context_of_every_slot() -> None:
    """llama-server divides -c among its -np slots; {ctx_total} keeps ctx_size per request."""
    argv = render_command(spec("srv --port {port} -c {ctx_total} -np {slots}", slots=3))
    assert argv == ["srv", "--port", "8081", "-c", str(3 * 4096), "-np", "3"]


def test_it_drops_empty_extra_args() -> None:
    assert render_command(spec("srv --port {port} {extra_args}")) == ["srv", "--port", "8081"]


def test_it_uses_the_configured_llama_server(settings) -> None:
    settings.LLAMA_SERVER_BIN = "/opt/llama/llama-server"
    assert render_command(spec("{llama_server} --port {port}"))[0] == "/opt/llama/llama-server"


def test_it_refuses_to_render_without_what_the_template_uses(models_dir) -> None:
    with pytest.raises(ValidationError, match="no model path"):
        render_command(spec("srv --port {port} -m {model_path}"))
    with pytest.raises(ValidationError, match="no context size"):
        render_command(spec("srv --port {port} -c {ctx_size}", ctx_size=None))
    with pytest.raises(ValidationError, match="no context size"):
        render_command(spec("srv --port {port} -c {ctx_total}", ctx_size=None))


@pytest.mark.parametrize(
    ("model_path", "reason"),
    [
        ("../x.gguf", "must not contain '..'"),
        ("sub dir/../../x.gguf", "must not contain '..'"),
        ("/etc/passwd", "must be relative"),
        ("/abs/model.gguf", "must be relative"),
        ("sub dir/m.bin", "must name a .gguf file"),
        ("", "must be relative"),
    ],
)
def test_it_refuses_model_paths_that_leave_the_models_dir(
    models_dir, model_path: str, reason: str
) -> None:
    with pytest.raises(ValidationError, match=reason):
        resolve_model_path(model_path)


def test_it_refuses_a_symlink_that_points_outside(models_dir, tmp_path) -> None:
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    (models_dir / "link.gguf").symlink_to(outside)
    (models_dir / "passwd.gguf").symlink_to("/etc/passwd")

    with pytest.raises(ValidationError, match="resolves outside the models directory"):
        resolve_model_path("link.gguf")
    with pytest.raises(ValidationError, match="resolves outside"):
        resolve_model_path("passwd.gguf")


def test_it_accepts_a_symlink_inside_the_models_dir(models_dir) -> None:
    (models_dir / "alias.gguf").symlink_to(models_dir / "sub dir" / "m.gguf")

    assert resolve_model_path("alias.gguf", must_exist=True) == models_dir / "sub dir" / "m.gguf"


def test_it_requires_the_file_only_at_launch(models_dir) -> None:
    assert resolve_model_path("later.gguf") == models_dir / "later.gguf"
    with pytest.raises(ValidationError, match="does not exist"):
        resolve_model_path("later.gguf", must_exist=True)


@pytest.mark.django_db
def test_it_validates_the_variant_model_path_on_clean(models_dir, tmp_path) -> None:
    engine = Engine.objects.create(
        name="m", kind="managed", command_template="srv --port {port} -m {model_path}"
    )
    model = ServedModel.objects.create(name="a")
    (models_dir / "out.gguf").symlink_to(tmp_path / "x.gguf")
    for bad in ("../x.gguf", "/etc/passwd", "out.gguf", "sub dir/m.txt"):
        with pytest.raises(ValidationError) as caught:
            EngineVariant(engine=engine, model=model, model_path=bad).full_clean()
        assert "model_path" in caught.value.message_dict

    EngineVariant(engine=engine, model=model, model_path="sub dir/m.gguf").full_clean()


@pytest.mark.django_db
def test_it_validates_engines_by_kind() -> None:
    with pytest.raises(ValidationError, match="needs its base URL"):
        Engine(name="e", kind="external").full_clean()
    with pytest.raises(ValidationError, match="needs a command"):
        Engine(name="m", kind="managed").full_clean()
    with pytest.raises(ValidationError, match=r"Unknown placeholder \{gpu\}"):
        Engine(name="m", kind="managed", command_template="srv --port {port} {gpu}").full_clean()
    with pytest.raises(ValidationError, match="leave it empty"):
        Engine(
            name="m", kind="managed", command_template="srv --port {port}", base_url="http://x:1"
        ).full_clean()
    with pytest.raises(ValidationError):
        Engine(name="e", base_url="http://a:1", extra_base_urls=["not a url"]).full_clean()
    Engine(name="m", kind="managed", command_template="srv --port {port}").full_clean()
