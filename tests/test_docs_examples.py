"""Every command and every Python block of README.md and docs/*.md runs here (issue 25, item 3).

The blocks are read from the docs themselves (```bash / ```python), so an example that breaks fails CI. They run
in a scratch folder that looks like the repository to them (configs/, fnf/ and heldout.txt there), with the few
things a user supplies swapped for tiny stand-ins:
  - /models/<an SD 1.x, SD3.5, FLUX.1, FLUX.2 folder>  -> a tiny random-weight folder of that family
    (tests/fnf_tiny_models.py, tiny_sd3.py, tiny_flux.py, tiny_flux2.py);
  - configs/*.yaml -> the same config shrunk to seconds (2 steps at 32x32, 1 training step, rank 4) and, where it
    names a reward or localizer file of the user's (/models/...), the smoke config's built-in reward/localizer;
  - X.yaml (the README's placeholder) -> configs/tiny_cpu_smoke.yaml on the tiny SD folder;
  - diffusers pipeline calls: num_inference_steps shrunk, 32x32.
A block that cannot run carries its reason in the doc, in an HTML comment on the line before it:
  <!-- not run: REASON -->                   the whole block
  <!-- not run (PREFIX; PREFIX2): REASON -->  the commands starting with one of the PREFIXes (the rest run)
  <!-- run by tests/FILE.py::TEST -->        run by that test (checked to exist)
Blocks without a language (output, layouts, sketches) are not commands; a test checks they hold none.
"""
import contextlib
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests import fnf_tiny_models, tiny_flux, tiny_flux2, tiny_flux2_klein, tiny_sd3, tiny_zimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
RUN_LANGS = ("bash", "sh", "python")
MARK = re.compile(r"<!--\s*(not run(?:\s*\((?P<prefix>[^)]*)\))?:\s*(?P<why>.*?)|run by (?P<test>\S+))\s*-->\s*$")
FAMILY = {"stable-diffusion-v1": "sd", "stable-diffusion-3": "sd3", "FLUX.1": "flux", "FLUX.2-klein": "flux2-klein",
          "FLUX.2": "flux2", "Z-Image": "z-image"}
CONFIG_FAMILY = {"sd15": "sd", "tiny": "sd", "sd35": "sd3", "flux1": "flux", "flux2_klein": "flux2-klein",
                 "flux2": "flux2", "sepen": "sd", "zimage": "z-image"}


class Block:
    def __init__(self, doc, line, lang, text, mark):
        self.doc, self.line, self.lang, self.text, self.mark = doc, line, lang, text, mark

    @property
    def id(self):
        return f"{self.doc}:{self.line}"


def blocks(doc):
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        line = text[:m.start()].count("\n") + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        found.append(Block(doc, line, m.group(1), m.group(2), mark))
    return found


ALL = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in ALL if b.lang in RUN_LANGS]


def commands(block):
    """(command text, argv) per shell command: continuation lines joined, comments dropped."""
    out = []
    for logical in re.sub(r"\\\n", " ", block.text).splitlines():
        argv = shlex.split(logical, comments=True)
        if argv:
            out.append((" ".join(argv), argv))
    return out


def skipped_prefix(block):
    """The command prefixes a partial not-run mark names (a tuple), or None."""
    if block.mark and block.mark.group("prefix"):
        return tuple(p.strip() for p in block.mark.group("prefix").split(";") if p.strip())
    return None


def whole_block_skipped(block):
    return bool(block.mark and block.mark.group("why") is not None and skipped_prefix(block) is None)


# ---------------------------------------------------------------- the checks of the markup itself
def test_blocks_are_found_and_every_skip_gives_a_reason():
    assert len(RUNNABLE) >= 20, [b.id for b in RUNNABLE]
    for b in RUNNABLE:
        if b.mark and b.mark.group("why") is not None:
            assert len(b.mark.group("why").strip()) > 10, f"{b.id}: a not-run mark needs its reason"
        if b.mark and b.mark.group("test"):
            path, _, name = b.mark.group("test").partition("::")
            assert f"def {name}(" in open(os.path.join(ROOT, path), encoding="utf-8").read(), b.id
        for prefix in skipped_prefix(b) or ():
            assert any(cmd.startswith(prefix) for cmd, _ in commands(b)), f"{b.id}: no command starts with {prefix!r}"


def test_untagged_blocks_hold_no_commands():
    """A command in a block without a language would never run here: tag it ```bash."""
    for b in ALL:
        if b.lang == "":
            bad = [ln for ln in b.text.splitlines() if re.match(r"\s*(fnf|python|pip|make|accelerate) ", ln)]
            assert not bad, f"{b.id}: tag this block ```bash (or ```python): {bad}"


# ---------------------------------------------------------------- the scratch folder the blocks run in
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    models = str(tmp_path_factory.mktemp("models"))
    cwd = tmp_path_factory.mktemp("docs_template")
    os.symlink(os.path.join(ROOT, "fnf"), cwd / "fnf")
    (cwd / "heldout.txt").write_text("a red car\na blue ball\n")
    (cwd / "configs").mkdir()
    shutil.copytree(os.path.join(ROOT, "configs", "prompts"), cwd / "configs" / "prompts")
    shutil.copytree(os.path.join(ROOT, "configs", "accelerate"), cwd / "configs" / "accelerate")
    folders = {}

    def folder(family):
        if family not in folders:
            if family == "sd":
                folders[family] = fnf_tiny_models.cached_model("sd", models)
            elif family == "sd3":
                folders[family] = tiny_sd3.cached_sd3(models)
            elif family == "flux":
                folders[family] = tiny_flux.cached_flux(models)
            elif family == "z-image":
                if not tiny_zimage.have_zimage():
                    pytest.skip("this diffusers has no ZImagePipeline")
                folders[family] = tiny_zimage.cached_zimage(models)
            elif family == "flux2-klein":
                if not tiny_flux2_klein.have_klein():
                    pytest.skip("this diffusers has no FLUX.2 [klein]")
                folders[family] = tiny_flux2_klein.cached_flux2_klein(models)
            else:
                if not tiny_flux2.have_flux2():
                    pytest.skip("this diffusers has no FLUX.2")
                folders[family] = tiny_flux2.cached_flux2(models)
        return folders[family]

    smoke = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny_cpu_smoke.yaml")))
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        name = os.path.basename(path)
        family = next((f for key, f in CONFIG_FAMILY.items() if name.startswith(key)), None)
        if family is None:
            continue
        cfg = yaml.safe_load(open(path))
        cfg["model"]["path"] = f"@{family}"
        for section in ("reward", "localize"):
            if "/models/" in yaml.safe_dump(cfg.get(section, {})):
                cfg[section] = smoke[section]
        cfg.setdefault("sampling", {}).update(steps=2, height=32, width=32)
        if "truncation_k" in cfg["sampling"]:
            cfg["sampling"]["truncation_k"] = 1
        cfg.setdefault("lora", {}).update(rank=4, alpha=4)
        cfg.setdefault("train", {}).update(steps=1, batch_size=1, grad_accum=1, checkpoint_every=1, sample_every=1,
                                           device="cpu")
        cfg.setdefault("memory", {})["mixed_precision"] = "no"
        (cwd / "configs" / name).write_text(yaml.safe_dump(cfg))
    (cwd / "X.yaml").write_text((cwd / "configs" / "tiny_cpu_smoke.yaml").read_text())

    def prepare(text):
        """The block's text with the user's model folders swapped for tiny ones (built on first use)."""
        def swap(m):
            family = next(f for key, f in FAMILY.items() if m.group(1).startswith(key))
            return folder(family)
        families = r"stable-diffusion-v1|stable-diffusion-3|FLUX\.1|FLUX\.2|Z-Image"
        text = re.sub(rf"/models/((?:{families})[\w.-]*)", swap, text)
        return text.replace("num_inference_steps=", "height=32, width=32, num_inference_steps=2 or ")

    # configs name their family's model as "@family": written out once the tiny folder exists
    def config_models(text, where):
        for name in os.listdir(os.path.join(where, "configs")):
            if name.endswith(".yaml") and (name in text or (name == "tiny_cpu_smoke.yaml" and "X.yaml" in text)):
                path = os.path.join(where, "configs", name)
                body = open(path).read()
                m = re.search(r"path: '?@([\w-]+)'?", body)
                if m:
                    with open(path, "w") as f:
                        f.write(body.replace(m.group(0), f"path: {folder(m.group(1))}"))
        shutil.copy(os.path.join(where, "configs", "tiny_cpu_smoke.yaml"), os.path.join(where, "X.yaml"))

    cwds = {}

    def cwd_for(doc):
        """Each doc runs in its own copy of the scratch folder (its runs/ start empty, as for a reader of it)."""
        if doc not in cwds:
            cwds[doc] = str(tmp_path_factory.mktemp("docs_cwd"))
            shutil.copytree(cwd, cwds[doc], symlinks=True, dirs_exist_ok=True)
        return cwds[doc]

    return {"cwd_for": cwd_for, "prepare": prepare, "config_models": config_models}


def _loras_first(argv, where):
    """A `--lora runs/NAME/lora` that another page trained (README's runs/fix): train it here first, 1 step."""
    if "--lora" not in argv:
        return
    for path in argv[argv.index("--lora") + 1:]:
        if path.startswith("-"):
            break
        if path.startswith("runs/") and not os.path.exists(os.path.join(where, path)):
            code, out = _run_fnf(["train", "--config", "configs/sd15_artifacts.yaml", "--out", os.path.dirname(path)],
                                 where)
            assert code == 0, out


def _run_fnf(argv, cwd):
    from fnf import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                code = cli.main(argv)
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(old)
    return code or 0, out.getvalue()


def run_block(block, world):
    where = world["cwd_for"](block.doc)
    world["config_models"](block.text, where)
    text = world["prepare"](block.text)
    if block.lang == "python":
        old = os.getcwd()
        os.chdir(where)
        try:
            exec(compile(text, block.id, "exec"), {"__name__": "__docs__"})
        finally:
            os.chdir(old)
        return
    prefix = skipped_prefix(block)
    skipped = {cmd for cmd, _ in commands(block) if prefix and cmd.startswith(prefix)}
    for (cmd, _), (_, argv) in zip(commands(block), commands(Block("", 0, "", text, None))):
        if cmd in skipped:
            continue
        if argv[0] == "fnf":
            _loras_first(argv, where)
            code, out = _run_fnf(argv[1:], where)
        else:
            env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
            argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
            result = subprocess.run(argv, cwd=where, capture_output=True, text=True, timeout=600, env=env)
            code, out = result.returncode, result.stdout + result.stderr
        assert code == 0, f"{block.id}: `{cmd}` exited {code}:\n{out[-3000:]}"


# Blocks over a few seconds each (a tiny model built, several trainings): slow.
SLOW = {"docs/family_sd3.md", "docs/family_flux.md", "docs/family_flux2.md", "docs/memory_levers.md",
        "docs/family_zimage.md"}


def _params():
    out = []
    for b in RUNNABLE:
        marks = []
        if whole_block_skipped(b) or (b.mark and b.mark.group("test")):
            marks.append(pytest.mark.skip(reason=b.mark.group("why") or f"run by {b.mark.group('test')}"))
        elif b.doc in SLOW or re.search(r"/models/(stable-diffusion-3|FLUX|Z-Image)", b.text):
            marks.append(pytest.mark.slow)
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


@pytest.mark.parametrize("block", _params())
def test_doc_block_runs(block, world):
    run_block(block, world)
