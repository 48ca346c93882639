"""Files written so that neither a concurrent reader nor a crash ever sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` beside `path`, flush it to disk, then rename it over `path`: a reader (another
    rank) sees the old file or the new one, and a crash or power loss leaves one of them whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
