"""The database the gateway runs on: PostgreSQL 18 with a working pgvector."""

from __future__ import annotations

import pytest
from django.db import connection

pytestmark = pytest.mark.django_db


def scalar(sql: str) -> object:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def test_it_runs_on_postgresql_18() -> None:
    assert connection.vendor == "postgresql"
    assert int(scalar("SHOW server_version_num")) // 10000 == 18


def test_it_has_the_vector_extension_installed() -> None:
    assert scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")


def test_it_orders_rows_by_cosine_distance() -> None:
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE docs (name text, embedding vector(3))")
        cursor.execute(
            "INSERT INTO docs VALUES ('same', '[1,0,0]'), ('near', '[1,1,0]'), "
            "('opposite', '[-1,0,0]'), ('orthogonal', '[0,0,1]')"
        )
        cursor.execute(
            "SELECT name, embedding <=> '[2,0,0]' FROM docs ORDER BY embedding <=> '[2,0,0]'"
        )
        rows = cursor.fetchall()
    assert [name for name, _ in rows] == ["same", "near", "orthogonal", "opposite"]
    distances = dict(rows)
    # Cosine distance ignores length: [2,0,0] points the same way as [1,0,0].
    assert distances["same"] == pytest.approx(0.0)
    assert distances["near"] == pytest.approx(1 - 2**-0.5)
    assert distances["orthogonal"] == pytest.approx(1.0)
    assert distances["opposite"] == pytest.approx(2.0)
