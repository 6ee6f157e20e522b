"""setup.py's dependency floors are exactly the versions `make floor-check` installs (ci/floors.txt), and the
versions installed here satisfy them."""
import os
import re
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _floors_in_setup() -> dict[str, str]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)', text)}


def _pins() -> dict[str, str]:
    pins = {}
    with open(os.path.join(ROOT, "ci", "floors.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[name.strip().lower()] = version.strip()
    return pins


def _tuple(version: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def test_every_floor_is_pinned_for_the_floor_check():
    floors, pins = _floors_in_setup(), _pins()
    assert floors, "no floors found in setup.py"
    assert floors == pins, {"setup.py only": floors.keys() - pins.keys(), "floors.txt only": pins.keys() - floors.keys(),
                            "differ": {k: (floors[k], pins[k]) for k in floors.keys() & pins.keys() if floors[k] != pins[k]}}


def test_installed_versions_satisfy_the_floors():
    for name, floor in _floors_in_setup().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra that is not installed here
        assert _tuple(installed) >= _tuple(floor), (name, installed, floor)
