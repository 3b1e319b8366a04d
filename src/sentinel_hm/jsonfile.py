"""JSON files, gzip-compressed when the name ends in ``.gz``: how traces and plans are stored.

Reading parses JSON only (nothing is executed) and detects gzip by its magic
bytes, so a renamed file still loads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from sentinel_hm.errors import SentinelError


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    text = json.dumps(data, separators=(",", ":"))
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def read_json(path: str | Path, what: str) -> Any:
    """Parse ``path``; `SentinelError` naming the file (and ``what`` it should be) otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw)
    except FileNotFoundError:
        raise SentinelError(f"{path}: no such file") from None
    except (OSError, EOFError) as e:
        raise SentinelError(f"{path}: cannot read: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SentinelError(f"{path}: not a {what} file (invalid JSON: {e})") from None
