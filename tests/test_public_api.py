"""The public Python API at the package root (fnf/__init__.py): every name exists, says what it does, and the
README's "Python API" section lists it, so internal modules can move without breaking callers."""
import os
import re

import fnf

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_every_public_name_exists_and_has_a_docstring():
    missing = [n for n in fnf.__all__ if not hasattr(fnf, n)]
    assert not missing, f"fnf.__all__ names that fnf does not define: {missing}"
    undocumented = [n for n in fnf.__all__ if not (getattr(fnf, n).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_the_readme_lists_the_public_api():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = re.search(r"^## Python API\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Python API' section"
    listed = set(re.findall(r"`fnf\.(\w+)", section.group(1)))
    assert set(fnf.__all__) <= listed, f"not in the README's Python API section: {sorted(set(fnf.__all__) - listed)}"
    assert listed <= set(fnf.__all__), f"in the README but not public: {sorted(listed - set(fnf.__all__))}"


def test_public_names_are_the_modules_own_objects():
    """fnf.<name> is the object its module defines (a re-export, not a copy or a wrapper)."""
    from fnf import families, lora, sampling

    assert fnf.load_model is families.registry.load_model
    assert fnf.add_lora is lora.add_lora and fnf.draft_k is sampling.draft_k


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python API example, as written (its LoRA folder redirected into a temporary folder)."""
    with open(README, encoding="utf-8") as f:
        section = re.search(r"^## Python API\n(.*?)^## ", f.read(), re.S | re.M).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = str(tmp_path / "api_lora")
    assert "runs/api_lora" in code
    monkeypatch.chdir(os.path.dirname(README))
    scope: dict = {}
    exec(compile(code.replace('"runs/api_lora"', repr(out)), "README.md", "exec"), scope)  # noqa: S102
    model, params = scope["model"], scope["params"]
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.denoiser.named_parameters() if "lora_" not in n)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))
    reloaded = fnf.load_model(os.path.join(os.path.dirname(README), "fnf", "assets", "toy", "sd"))
    fnf.load_lora(reloaded, out)
