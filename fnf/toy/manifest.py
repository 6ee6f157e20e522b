"""Write / check fnf/assets/toy/MANIFEST.json: sha256 and size of every shipped file, and how each was made.

    python -m fnf.toy.manifest          # write
    python -m fnf.toy.manifest --check  # verify (exit 1 on a mismatch)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

from . import ASSETS

NAME = "MANIFEST.json"
LIMIT_BYTES = 25 * 1024 * 1024
COMMANDS = {
    "sd": "HF_HUB_OFFLINE=1 python -m fnf.toy.train_sd --out fnf/assets/toy/sd   (seeds and the exact command of the "
          "shipped run, which reused the v2 VAE with --vae-from: sd/training.json)",
    "small": "HF_HUB_OFFLINE=1 python -m fnf.toy.train_small   (seeds: see <model>/config.json 'train')",
}


def files(root: str = ASSETS) -> dict:
    out = {}
    for d, _, names in os.walk(root):
        for n in sorted(names):
            path = os.path.join(d, n)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel == NAME:
                continue
            with open(path, "rb") as f:
                out[rel] = {"sha256": hashlib.sha256(f.read()).hexdigest(), "bytes": os.path.getsize(path)}
    return dict(sorted(out.items()))


def write(root: str = ASSETS) -> dict:
    fs = files(root)
    man = {"files": fs, "total_bytes": sum(v["bytes"] for v in fs.values()), "commands": COMMANDS}
    with open(os.path.join(root, NAME), "w") as f:
        json.dump(man, f, indent=1)
    return man


def check(root: str = ASSETS) -> list[str]:
    """Problems found (empty when the manifest matches the files)."""
    with open(os.path.join(root, NAME)) as f:
        man = json.load(f)
    now = files(root)
    problems = [f"{k}: missing" for k in man["files"] if k not in now]
    problems += [f"{k}: not in manifest" for k in now if k not in man["files"]]
    problems += [f"{k}: sha256 differs" for k in now if k in man["files"] and now[k] != man["files"][k]]
    total = sum(v["bytes"] for v in now.values())
    if total > LIMIT_BYTES:
        problems.append(f"assets total {total} bytes > {LIMIT_BYTES}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    p.add_argument("--root", default=ASSETS)
    args = p.parse_args(argv)
    if args.check:
        problems = check(args.root)
        print("\n".join(problems) or "manifest OK")
        return 1 if problems else 0
    man = write(args.root)
    print(f"wrote {os.path.join(args.root, NAME)}: {len(man['files'])} files, {man['total_bytes']} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
