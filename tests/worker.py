"""How the Python worker calls the app's functions, for tests that call them directly."""

from __future__ import annotations

import json

from functions.intake import dataset_intake
from shared.dev.localhost import Trigger, blob_trigger_argument
from shared.vocabulary import DATASETS_CONTAINER


def deliver_upload(name: str, container: str = DATASETS_CONTAINER) -> None:
    """Call `dataset_intake` for a blob as the worker does: with the BlobClient the binding
    extension builds from the host's model binding data."""
    function = dataset_intake.build()
    (binding,) = json.loads(function.get_function_json())["bindings"]
    trigger = Trigger(function.get_function_name(), binding["type"], binding, function.get_user_function())
    trigger.call(blob_trigger_argument(trigger, container, name))
