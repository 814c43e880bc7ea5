from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from apps.engines.models import ServedModel
from apps.quotas.management.commands._scope import decimal_option
from apps.quotas.services import price_set


class Command(BaseCommand):
    help = "Set a model's prices in currency units per million tokens (for cost budgets)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("model", help="The served model's name.")
        parser.add_argument("--input", required=True, help="Per million prompt tokens.")
        parser.add_argument("--output", required=True, help="Per million completion tokens.")
        parser.add_argument(
            "--cached-input", help="Per million cached prompt tokens (default: the input price)."
        )

    def handle(self, *args: Any, model: str, **options: Any) -> None:
        prices = {
            "input_price": decimal_option(options["input"], "--input"),
            "output_price": decimal_option(options["output"], "--output"),
        }
        if options["cached_input"] is not None:
            prices["cached_input_price"] = decimal_option(options["cached_input"], "--cached-input")
        served = ServedModel.objects.filter(name=model).first()
        if served is None:
            raise CommandError(f"No served model named {model!r} (see add_engine).")
        try:
            price = price_set(model=served, **prices)
        except ValueError as e:
            raise CommandError(str(e)) from e
        cached = price.cached_input_per_million
        self.stdout.write(
            f"Prices of {served.name} per million tokens: input {price.input_per_million}, "
            f"output {price.output_per_million}, cached input "
            f"{cached if cached is not None else f'{price.input_per_million} (the input price)'}."
        )
