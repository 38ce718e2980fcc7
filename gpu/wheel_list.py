"""The one list of wheels a bare GPU machine lacks (gpu/requirements.txt), resolved to exact
pins: a bare name takes its version from the constraints file the list names (`-c
../requirements.txt`), so the versions are written once. Standard library only."""
from __future__ import annotations

import re
from pathlib import Path

GPU_DIR = Path(__file__).resolve().parent
WHEEL_LIST = GPU_DIR / "requirements.txt"
WHEEL_DIR = GPU_DIR / "wheels"

_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*([A-Za-z0-9.+!_-]+))?$")


class WheelListError(ValueError):
    """A line of the wheel list or of its constraints file that cannot be resolved to a pin."""


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lines(path: Path):
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


def read_pins(path: Path) -> dict[str, str | None]:
    """{normalized name: version or None} of a requirements file's plain `name[==version]` lines
    (other lines, such as options or ranges, are not pins and are skipped)."""
    pins = {}
    for _, line in _lines(path):
        m = _REQUIREMENT.match(line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def wheel_specs(path: Path = WHEEL_LIST) -> list[tuple[str, str]]:
    """[(name, version)] in the list's order; every entry pinned exactly, each name once."""
    path = Path(path)
    constraints: dict[str, str | None] = {}
    specs, seen = [], set()
    for number, line in _lines(path):
        where = f"{path}:{number}"
        if line.startswith("-c "):
            constraints.update(read_pins(path.parent / line[3:].strip()))
            continue
        m = _REQUIREMENT.match(line)
        if not m:
            raise WheelListError(f"{where}: {line!r} is not `name` or `name==version`")
        name, version = m.group(1), m.group(2)
        key = normalize(name)
        if key in seen:
            raise WheelListError(f"{where}: {name} is listed twice")
        pinned = constraints.get(key)
        if version is None:
            if pinned is None:
                raise WheelListError(f"{where}: {name} has no version here and no `{name}==...` pin in the "
                                     "constraints file")
            version = pinned
        elif pinned is not None and pinned != version:
            raise WheelListError(f"{where}: {name}=={version} contradicts the constraints file's {pinned}")
        seen.add(key)
        specs.append((name, version))
    return specs


def wheel_file_key(filename: str) -> tuple[str, str]:
    """(normalized name, version) of a wheel file name (`name-version-...-tag.whl`)."""
    parts = Path(filename).name.split("-")
    if len(parts) < 5 or not filename.endswith(".whl"):
        raise WheelListError(f"{filename} is not a wheel file name")
    return normalize(parts[0]), parts[1]


def match_wheels(specs: list[tuple[str, str]], wheel_dir: Path = WHEEL_DIR) -> tuple[dict, list, list]:
    """({(name, version): wheel path}, [missing specs], [wheels of the folder not in the list
    or of another version])."""
    wheels = sorted(Path(wheel_dir).glob("*.whl")) if Path(wheel_dir).is_dir() else []
    wanted = {(normalize(n), v): (n, v) for n, v in specs}
    found, extra = {}, []
    for w in wheels:
        key = wheel_file_key(w.name)
        if key in wanted and wanted[key] not in found:
            found[wanted[key]] = w
        else:
            extra.append(w)
    missing = [s for s in specs if s not in found]
    return found, missing, extra
