"""critlib: find the few weights of a language model that matter most, measure them, test them causally.

The names a user imports, loaded on first use (so `import critlib` stays light)::

    from critlib import load_model, load_windows, analyze, perturbed, select_top, Zero
    from critlib.evaluate import evaluate                     # (the module shares its function's name)

    loaded = load_model("default", "fp32", "cpu", 0)          # the embedded SmolLM2-135M-Instruct
    windows = load_windows("default", loaded.tokenizer, 128, 8, 8)
    sens = analyze(loaded.model, windows.score, metrics=["grad_x_weight", "magnitude"], topk_global=100)
    sens.global_top("grad_x_weight", 5)                       # [(param, flat index, score), ...]
    sens.stats["grad_x_weight"]["global"]["percentiles"]       # exact, over every weight
    base = evaluate(loaded.model, windows.heldout)
    with perturbed(loaded.model, select_top(sens, "grad_x_weight", 10), Zero()) as applied:
        hit = evaluate(loaded.model, windows.heldout)         # restored bit for bit on exit
    hit["ppl"] / base["ppl"], applied.n_changed

    find_super_weights(loaded.model, default_prompt_ids(loaded.tokenizer))   # data-free candidates (Yu et al.)
    fp = fingerprint(loaded.model); verify(loaded.model, fp)["ok"]           # integrity
    dose_response(loaded.model, windows.heldout, {"top": lambda k, d: select_top(sens, "magnitude", k)},
                  ["zero", "sign_flip"], [1, 10])                # one row per selector x method x k

Everything that reads a params file and writes a run folder lives in `critlib.run`.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models", "load_windows": "data", "score_model": "scores", "analyze": "sensitivity",
    "AnalyzeConfig": "sensitivity", "Sensitivity": "sensitivity", "Selection": "perturb", "perturbed": "perturb",
    "select_top": "perturb", "select_random": "perturb", "Zero": "perturb", "SignFlip": "perturb",
    "Noise": "perturb", "BitFlip": "perturb", "dose_response": "experiments",
    "find_super_weights": "superweights", "default_prompt_ids": "superweights", "fingerprint": "integrity",
    "verify": "integrity", "freeze_weights": "freeze", "load_params": "params",
}

__all__ = ["CritlibError", "__version__", *_EXPORTS]


class CritlibError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'critlib' has no attribute '{name}'")


def __dir__():
    return sorted(__all__)
