"""`manage.py set_fallbacks MODEL FALLBACK [...]` / `--none`, and the admin's check."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from apps.engines.models import ServedModel
from apps.engines.registry import load_snapshot
from apps.engines.services import engine_register_external

pytestmark = pytest.mark.django_db


@pytest.fixture
def models() -> None:
    engine_register_external(name="e", base_url="http://127.0.0.1:1", models=["a", "b", "c"])


def test_it_sets_fallbacks_in_order_and_the_registry_routes_them(models, capsys):
    call_command("set_fallbacks", "a", "c", "b")
    assert ServedModel.objects.get(name="a").fallbacks == ["c", "b"]
    assert load_snapshot().models["a"].fallbacks == ("c", "b")
    assert "a falls back to: c, b" in capsys.readouterr().out


def test_it_clears_fallbacks_with_none(models, capsys):
    call_command("set_fallbacks", "a", "b")
    call_command("set_fallbacks", "a", "--none")
    assert ServedModel.objects.get(name="a").fallbacks == []
    assert "a has no fallbacks." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "a"], "No such model: nope."),
        (["a", "zz"], "No such model: zz."),
        (["a", "a"], "cannot fall back to itself"),
        (["a", "b", "b"], "Name each fallback once."),
        (["a"], "Give at least one FALLBACK"),
        (["a", "b", "--none"], "not both"),
    ],
)
def test_it_refuses_bad_fallbacks_in_one_line(models, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("set_fallbacks", *args)
    assert ServedModel.objects.get(name="a").fallbacks == []


def test_the_admin_form_checks_fallbacks_too(models):
    model = ServedModel.objects.get(name="a")
    model.fallbacks = ["missing"]
    with pytest.raises(ValidationError, match="No such model: missing"):
        model.full_clean()
