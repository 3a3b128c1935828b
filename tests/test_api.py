"""The public Python API: functions stay functions whatever has been imported."""

import subprocess
import sys


def test_public_functions_are_not_shadowed_by_modules():
    code = (
        "import styletune, styletune.training, styletune.probing, styletune.comparison, styletune.evaluation\n"
        "import styletune.exporting, styletune.server\n"
        "for name in ('load_model', 'generate', 'probe', 'train', 'compare', 'evaluate', 'export', 'serve'):\n"
        "    assert callable(getattr(styletune, name)) and type(getattr(styletune, name)).__name__ == 'function', name\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_does_not_load_torch():
    code = "import sys, styletune, styletune.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_api_generates(tiny_model_dirs):
    import styletune

    lm = styletune.load_model(str(tiny_model_dirs["gpt2"]), device="cpu", dtype="float32")
    [s] = styletune.generate(lm, ["Once"], styletune.DecodingConfig(max_new_tokens=3, greedy=True, stop_at_eos=False))
    assert len(s.token_ids) == 3
    cands = styletune.probe(lm, "Once", top=3)
    assert [c.rank for c in cands] == [1, 2, 3]
