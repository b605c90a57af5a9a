"""The install's two constraints files agree with each other and with pyproject.toml.

tools/install.sh passes both constraints.txt (the pins we chose) and constraints.lock (every package, written by
tools/lock.sh) to pip. A pin changed in one and not the other makes pip fail with a resolver error far from the
cause; these tests name the package instead.
"""

import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins(name: str) -> dict[str, str]:
    """{canonical package name: version} of a constraints file's `name==version` lines."""
    found = {}
    with open(os.path.join(ROOT, name)) as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
                assert match, f"{name}: {line!r} is not a name==version pin"
                found[canonicalize_name(match[1])] = match[2]
    return found


def test_lock_pins_what_constraints_txt_pins_at_the_same_version():
    lock = pins("constraints.lock")
    for package, version in pins("constraints.txt").items():
        assert lock.get(package) == version, f"constraints.txt pins {package}=={version}, the lock {lock.get(package)}"


def test_locked_versions_satisfy_pyproject_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    lock = pins("constraints.lock")
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    for requirement in map(Requirement, requirements):
        version = lock.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} (pyproject.toml) is not in constraints.lock"
        locked = f"{requirement.name}=={version}"
        assert requirement.specifier.contains(version), f"constraints.lock has {locked}; pyproject.toml: {requirement}"


def test_lock_does_not_pin_this_package():
    assert "openrlhf-gmpo" not in pins("constraints.lock")
