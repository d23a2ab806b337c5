"""The device package's public surface loads lazily, so a board importing only the core stays small."""

from __future__ import annotations

import subprocess
import sys

import pytest

import smartx_device


def test_importing_the_core_does_not_load_the_client():
    code = ("import sys, smartx_device.cbor, smartx_device.session; "
            "print(sorted(m for m in sys.modules if m.startswith('smartx_device')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert "smartx_device.session" in loaded
    assert "smartx_device.client" not in loaded and "smartx_device.queue" not in loaded


@pytest.mark.parametrize("name", smartx_device.__all__)
def test_every_public_name_resolves(name):
    assert getattr(smartx_device, name) is not None


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError):
        smartx_device.NoSuchThing  # noqa: B018
    with pytest.raises(AttributeError):
        smartx_device._private  # noqa: B018
    with pytest.raises(AttributeError):
        smartx_device.__wrapped__  # noqa: B018


def test_submodules_import_by_from():
    from smartx_device import backoff, jwt

    assert jwt.__name__ == "smartx_device.jwt" and backoff.__name__ == "smartx_device.backoff"
