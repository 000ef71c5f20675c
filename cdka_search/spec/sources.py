"""Model sources: a closed name -> Source registry, ``SOURCES``, tried in order; the first that matches reads.

Each source kind has a cheap ``matches(model, path)`` test (the text the user gave, and the local path
it names when that path exists, else None) and a loader named by (module, function), imported only
when that kind reads. A path loader gets the path; a name loader (presets) gets the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cdka_search.registry import Entry


@dataclass(frozen=True)
class Source:
    """One kind of model source: when it applies and which function reads it."""

    matches: Callable[[str, Path | None], bool]
    loader: Entry
    reads_name: bool = False  # the loader takes the text (a preset name), not the path


def existing_path(model: str) -> Path | None:
    """The local file or folder ``model`` names, or None when there is none."""
    try:
        path = Path(model).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError):  # a name too long for the file system; ~user of no such user
        return None


def looks_like_path(model: str) -> bool:
    """Text that can only mean a file or folder, so a missing one is not read as a preset name."""
    return "/" in model or model.endswith((".json", ".safetensors"))


def _config_folder(model: str, path: Path | None) -> bool:
    return path is not None and path.is_dir() and (path / "config.json").exists()  # a FIFO too: its reader says what it is


def _weights_folder(model: str, path: Path | None) -> bool:
    return path is not None and path.is_dir()


def _weights_file(model: str, path: Path | None) -> bool:
    return path is not None and not path.is_dir() and path.name.endswith((".safetensors", ".index.json"))


def _config_file(model: str, path: Path | None) -> bool:
    return path is not None and not path.is_dir() and path.suffix == ".json"


def _preset_name(model: str, path: Path | None) -> bool:
    return path is None and not looks_like_path(model)


#: Source kind -> Source, in the order they are tried. Closed: no import path is ever read from input.
SOURCES: dict[str, Source] = {
    "hf-folder": Source(_config_folder, ("cdka_search.spec.hf_config", "config_spec")),
    "safetensors-folder": Source(_weights_folder, ("cdka_search.spec.safetensors_header", "safetensors_spec")),
    "safetensors-file": Source(_weights_file, ("cdka_search.spec.safetensors_header", "safetensors_spec")),
    "config-file": Source(_config_file, ("cdka_search.spec.hf_config", "config_spec")),
    "preset": Source(_preset_name, ("cdka_search.spec.presets", "preset_spec"), reads_name=True),
}
