"""Interchange intervention training, known-answer organisms and localisation scores."""

import pytest
import torch
from torch import nn

from archbench import component_rankers, iit, iit_sites, known_answer, localisation, registry, zoo
from archbench.adapter import Adapter, Site, hook
from archbench.adapters.transformer import TransformerAdapter
from archbench.hooks import HookPoint
from archbench.tasks import Count, ModAdd

torch.set_num_threads(1)

D = ("batch", "pos", "d")
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_mlp": 64}


# ---- ordinary training is unchanged ------------------------------------------------------

def _state_after_fit(**hooks):
    task = Count(length=6, m=3)
    adapter = TransformerAdapter.for_task(task, 0, d_model=16, n_layers=1, n_heads=2, d_mlp=32)
    adapter.fit(task, 0, steps=12, batch=16, n_train=128, eval_every=6, **hooks)
    return adapter.model.state_dict()


def test_fit_without_hooks_and_with_a_zero_extra_loss_is_bit_identical():
    plain = _state_after_fit()
    for hooks in ({"extra_loss": None, "val_metric": None}, {"extra_loss": lambda step: torch.zeros(())}):
        other = _state_after_fit(**hooks)
        assert plain.keys() == other.keys()
        assert all(torch.equal(plain[k], other[k]) for k in plain), hooks


# ---- the designated-site table -----------------------------------------------------------

@pytest.mark.parametrize("family", sorted(iit_sites.DESIGNATED))
def test_every_designated_site_is_the_last_mixer_among_components_at_the_answer(family):
    task = Count(length=4, m=3)
    adapter = registry.adapter(family).for_task(task, 0)
    al = iit_sites.alignment(adapter, task)
    spec = adapter.specs[al.designated]
    assert spec.role == "mixer" and al.position == adapter.answer_position(task.seq_len)
    assert spec.layer == max(adapter.specs[c].layer for c in al.candidates)
    assert {adapter.specs[c].role for c in al.candidates} <= set(iit_sites.CANDIDATE_ROLES)
    assert len(al.others) >= 1


def test_reservoirs_are_not_applicable_and_the_stream_is_never_designated():
    for family in ("reservoir", "nvar"):
        assert "readout" in iit_sites.why_not(family)
    adapter = TransformerAdapter.for_task(Count(length=4, m=3), 0, **TINY)
    with pytest.raises(ValueError, match="never the residual stream"):
        iit.Alignment("blocks.1.resid_post", ("blocks.1.resid_post", "blocks.0.attn.out"), 4).check(adapter)
    with pytest.raises(ValueError, match="no known-answer organisms"):
        known_answer.organism("reservoir", Count(length=4, m=3), 0)


# ---- localisation on a planted known-answer model ----------------------------------------

class _PlantedSum(nn.Module):
    """modadd by hand: `blocks.1.attn.out` writes one-hot (a + b) mod p at the last position
    and alone feeds the logits; `blocks.1.mlp.out` copies it and is ignored (a probe reads
    the sum there too); `blocks.0.mlp.out` holds one-hot a and is ignored."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.decoy, self.mix, self.copy = HookPoint(), HookPoint(), HookPoint()

    def forward(self, tokens):
        n, T = tokens.shape
        onehot = nn.functional.one_hot
        self.decoy(onehot(tokens[:, :1].expand(n, T), self.p + 1).float())  # (n, T, p + 1) unused
        total = torch.zeros(n, T, self.p + 1)  # (n, T, p + 1)
        total[:, -1] = onehot((tokens[:, 0] + tokens[:, 1]) % self.p, self.p + 1).float()
        mixed = self.mix(total)
        self.copy(mixed.clone())  # unused
        return 10.0 * mixed  # (n, T, vocab)


class PlantedSum(Adapter):
    family = "planted-sum"
    default_config = {}

    @classmethod
    def build_model(cls, config):
        return _PlantedSum(config["vocab_size"] - 1)

    def forward(self, tokens):
        return self.model(tokens)

    def hooks(self):
        m = self.model
        return [hook("blocks.0.mlp.out", "mlp", D, 0, Site(m.decoy)),
                hook("blocks.1.attn.out", "mixer", D, 1, Site(m.mix)),
                hook("blocks.1.mlp.out", "mlp", D, 1, Site(m.copy))]


PLANTED = iit.Alignment("blocks.1.attn.out", ("blocks.0.mlp.out", "blocks.1.attn.out", "blocks.1.mlp.out"), 2)


def test_patching_ranks_the_planted_component_first_and_the_probe_ties_it_with_a_copy():
    task = ModAdd(p=11)
    adapter = PlantedSum.for_task(task, 0)
    patch = localisation.patching_scores(adapter, task, 0, PLANTED, n_pairs=64)
    assert patch == {"blocks.0.mlp.out": 0.0, "blocks.1.attn.out": 1.0, "blocks.1.mlp.out": 0.0}
    got = localisation.localisation(PLANTED.designated, patch, threshold=0.5)
    assert got["rank"] == 1 and got["precision"] == 1.0 and got["recall"] == 1.0
    probe = localisation.probe_scores(adapter, task, 0, PLANTED, n_train=256, n_test=128)
    assert probe["blocks.1.attn.out"] == probe["blocks.1.mlp.out"] == 1.0
    got = localisation.localisation(PLANTED.designated, probe, threshold=0.5)
    assert got["rank"] == 2 and got["precision"] == 0.5 and got["recall"] == 1.0


class PlantedSumReadable(PlantedSum):
    """The planted sum with gradients, its logits' input as the stream, and a readout (x 10)."""

    family = "planted-sum-readable"
    capabilities = frozenset({"gradients", "readout"})

    def decode(self, stream):
        return 10.0 * stream  # (batch, pos, vocab)

    def hooks(self):
        return super().hooks() + [hook("blocks.1.resid_post", "stream", D, 1, Site(self.model.mix))]


# a ranker -> the designated component's rank on the planted sum (3 candidates): causal rankers
# put it first; correlational ones tie it with its unused copy; none ranks the unused input 1st
PLANTED_RANKS = {"patching": 1, "ablation": 1, "attribution": 1, "steering": 1,
                 "probe": 2, "logit_lens": 2, "tuned_lens": 2, "sae": 2}


def test_every_component_ranker_finds_the_planted_component_or_ties_it_with_its_copy():
    task = ModAdd(p=11)
    adapter = PlantedSumReadable.for_task(task, 0)
    assert set(component_rankers.RANKERS) == set(PLANTED_RANKS)
    for technique, expected in PLANTED_RANKS.items():
        scores = component_rankers.component_scores(technique, adapter, task, 0, PLANTED)
        assert set(scores) == set(PLANTED.candidates), technique
        assert localisation.rank(PLANTED.designated, scores) == expected, (technique, scores)
        if expected == 2:  # tied with the copy, strictly above the unused input
            assert scores["blocks.1.attn.out"] == pytest.approx(scores["blocks.1.mlp.out"]), (technique, scores)
            assert scores["blocks.1.attn.out"] > scores["blocks.0.mlp.out"] + 0.3, (technique, scores)
        else:  # the inert components do nothing
            assert scores["blocks.1.attn.out"] > 0.5, (technique, scores)
            assert abs(scores["blocks.1.mlp.out"]) < 0.05 and abs(scores["blocks.0.mlp.out"]) < 0.05, scores


def test_rankers_that_need_gradients_or_a_readout_do_not_apply_without_them():
    task = ModAdd(p=11)
    adapter = PlantedSum.for_task(task, 0)
    assert component_rankers.component_scores("attribution", adapter, task, 0, PLANTED) is None
    assert component_rankers.component_scores("logit_lens", adapter, task, 0, PLANTED) is None


def test_rank_counts_ties_against_the_designated_site():
    assert localisation.rank("a", {"a": 0.5, "b": 0.5, "c": 0.1}) == 2
    assert localisation.rank("a", {"a": 0.0, "b": 0.0, "c": 0.0}) == 3
    assert localisation.precision_recall("a", {"a": 0.1, "b": 0.9}, 0.5) == {
        "called": ["b"], "precision": 0.0, "recall": 0.0}
    details = [{"site": "a", "position": 2, "iia": 0.2}, {"site": "a", "position": 1, "iia": 0.9},
               {"site": "b", "position": 2, "iia": 0.4}, {"site": "z", "position": 2, "iia": 1.0}]
    assert localisation.scores_from_details(details, ["a", "b"], "iia", position=2) == {"a": 0.2, "b": 0.4}


def test_effects_and_summary_on_the_planted_model():
    task = ModAdd(p=11)
    adapter = PlantedSum.for_task(task, 0)
    effects = iit.interchange_effects(adapter, task, task.counterfactuals(64, 0, "test"), PLANTED)
    s = iit.summary(effects, PLANTED)
    assert s["iia"] == 1.0 and s["max_other_change"] == 0.0
    assert known_answer.gate_reason({"accuracy": 1.0, **s}) is None
    assert "IIA" in known_answer.gate_reason({"accuracy": 1.0, **s, "iia": 0.5})
    why = known_answer.gate_reason({"accuracy": 0.5, **s, "max_other_change": 0.3, "max_other_site": "x"})
    assert "held-out accuracy 0.500" in why and "patching x changes 0.300" in why


# ---- a tiny known-answer transformer, trained here -----------------------------------------

@pytest.fixture(scope="module")
def trained():
    task = Count(length=6, m=3)
    adapter = TransformerAdapter.for_task(task, 0, **TINY)
    al = iit_sites.alignment(adapter, task)
    report = iit.fit_iit(adapter, task, 0, al, steps=800, batch=64, lr=1e-3, grad_clip=1.0,
                         eval_every=50, n_pairs=1024, n_val_pairs=128, target=0.98)
    return task, adapter, al, report


def test_both_iit_terms_are_differentiable_and_reach_the_designated_block():
    task = Count(length=6, m=3)
    adapter = TransformerAdapter.for_task(task, 0, **TINY)
    al = iit_sites.alignment(adapter, task)
    pairs = iit.pair_batch(task.counterfactuals(32, 0, "train"), torch.arange(16))
    loss_iit, loss_strict = iit.iit_losses(adapter, pairs, al, torch.Generator().manual_seed(0))
    assert loss_iit.requires_grad and loss_strict.requires_grad
    (loss_iit + loss_strict).backward()
    q = adapter.model.model.layers[1].self_attn.q_proj.weight.grad
    assert q is not None and float(q.abs().sum()) > 0


def _fit_with_a_dipping_iit_metric(monkeypatch, **cfg):
    # the IIT metric as a real run shows it: highest at the first evaluation (nothing learnt,
    # no patch changes an answer), then lower while the task is learnt through every component
    iias = iter([1.0] + [0.0] * 50)
    real = iit.summary
    monkeypatch.setattr(iit, "summary", lambda effects, al: {**real(effects, al), "iia": next(iias)})
    task = Count(length=6, m=3)
    adapter = TransformerAdapter.for_task(task, 0, d_model=16, n_layers=1, n_heads=2, d_mlp=32)
    al = iit_sites.alignment(adapter, task)
    small = {"steps": 60, "batch": 8, "n_train": 64, "eval_every": 10, "n_pairs": 32, "n_val_pairs": 16,
             "target": 1.01}
    return iit.fit_iit(adapter, task, 0, al, **{**cfg, **small})


def test_known_answer_training_does_not_stop_on_the_first_evaluation_s_iit_metric(monkeypatch):
    monkeypatch.setitem(Adapter.train_config, "plateau_steps", 20)  # a family plateau window of 2 evaluations
    ordinary = _fit_with_a_dipping_iit_metric(monkeypatch)
    assert ordinary.stopped == "plateau" and ordinary.steps == 30  # measured against step 10's value
    known = _fit_with_a_dipping_iit_metric(monkeypatch, **known_answer.iit_config("transformer", Count()))
    assert known.stopped == "step cap" and known.steps == 60


@pytest.mark.slow  # about 25 s alone on one core, twice that on a shared one
def test_a_tiny_strict_iit_transformer_holds_count_at_its_last_mixer(trained):
    task, adapter, al, report = trained
    assert al.designated == "blocks.1.attn.out"
    m = known_answer.measure(adapter, task, 0, al)
    assert report.accuracy >= 0.9 and m["iia"] >= 0.9, (report.accuracy, m)
    assert m["max_other_change"] <= 0.1, m  # strict training made every other component inert
    patch = localisation.patching_scores(adapter, task, 0, al)
    assert localisation.rank(al.designated, patch) == 1
    control = TransformerAdapter.for_task(task, 0, **TINY)
    assert localisation.patching_scores(adapter, task, 0, al)[al.designated] > \
        localisation.patching_scores(control, task, 0, al)[al.designated] + 0.5


# ---- the zoo entry -----------------------------------------------------------------------

def test_known_answer_ids_add_iit_and_leave_ordinary_ids_alone(monkeypatch):
    task = Count()
    ordinary = zoo.organism_id("transformer", task, 0)
    oid = known_answer.organism_id("transformer", task, 0)
    assert oid.startswith("transformer/count/iit-seed0-") and oid != ordinary
    monkeypatch.setitem(known_answer.IIT_TRAIN, "*", {**known_answer.IIT_TRAIN["*"], "steps": 1})
    assert known_answer.organism_id("transformer", task, 0) != oid  # the knobs are in the identity
    assert zoo.organism_id("transformer", task, 0) == ordinary


def test_a_known_answer_organism_is_cached_gated_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(known_answer.IIT_TRAIN, "*", {"steps": 3, "batch": 8, "n_train": 64, "eval_every": 3,
                                                      "n_pairs": 32, "n_val_pairs": 16})
    task = Count(length=6, m=3)
    adapter, meta = zoo.known_answer_organism("transformer", task, 0)
    assert meta["known_answer"] and meta["designated"] == "blocks.1.attn.out"
    assert meta["gate"] != "pass" and "IIA" in meta["gate"]  # three steps teach nothing
    again, meta2 = zoo.known_answer_organism("transformer", task, 0)
    assert meta2["organism"] == meta["organism"] and meta2["iia"] == meta["iia"]
    state = adapter.model.state_dict()
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in state.items())
    assert not (tmp_path / "organisms" / zoo.organism_id("transformer", task, 0)).exists()


def test_the_iit_command_prints_a_row_with_the_reason_for_a_reservoir(capsys, tmp_path):
    from archbench.cli import main

    out = tmp_path / "iit.md"
    assert main(["iit", "--arch", "reservoir", "--task", "count", "--out", str(out)]) == 0
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.startswith("| family | task | seed | designated | candidates | behaviour | IIA")
    assert row.startswith("| reservoir | count | 0 |") and "n/a: only the linear readout" in row
    assert out.read_text().splitlines()[2] == row


def test_the_iit_command_stores_localisation_rows_and_the_report_draws_the_track(tmp_path, monkeypatch, capsys):
    from archbench import report_known_answer, store, verdict
    from archbench.cli import main

    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(known_answer.IIT_TRAIN, "*", {"steps": 3, "batch": 8, "n_train": 64, "eval_every": 3,
                                                      "n_pairs": 32, "n_val_pairs": 16})
    results = tmp_path / "results"
    assert main(["iit", "--arch", "transformer", "--task", "count", "--results", str(results)]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| transformer | count | 0 | blocks.1.attn.out | 4 |")
    with store.Store(results) as db:
        loc = db.localisation()
    assert set(loc.technique) == set(component_rankers.RANKERS) and len(loc) == 2 * len(component_rankers.RANKERS)
    assert set(loc.control) == {False, True} and (loc.n_candidates == 4).all()
    assert loc["rank"].between(1, 4).all()  # every ranker applies to the transformer
    assert (loc.gate != "pass").all()  # three steps teach nothing: no organism to score
    board = (results / "LEADERBOARD.md").read_text()
    assert "## Known-answer organisms" in board and "0/1 pass" in board and "## Localisation" not in board
    # the localisation table scores only organisms that pass, and reads MRR against H(n)/n
    passing = loc.assign(gate="pass")
    table = report_known_answer.localisation(passing, "transformer", verdict.Settings())
    assert table.header[1] == "transformer (n=4, chance 0.52)"
    patch = next(r for r in table.rows if r[0] == "patching")[1]
    rank = int(loc[(loc.technique == "patching") & ~loc.control]["rank"].iloc[0])
    assert patch.startswith(f"{1 / rank:.2f} ") and f"first {int(rank == 1)}/1" in patch
    assert report_known_answer.chance_mrr(2) == 0.75
