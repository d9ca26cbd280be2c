"""Episodic heads (Matching Networks, Relation Networks, a memory-augmented network)
against few-line direct computations, a hand-computed memory example, learning a toy
episode task, and the whole path: train, save, load, evaluate, refuse what they cannot do."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from metanet import space as spaces
from metanet.graph import discretise
from metanet.config import ConfigError, TrainConfig
from metanet.heads import MatchingHead, MemoryHead, RelationHead, make_head
from metanet.executor import forward_genotype
from metanet.meta import MetaNet, ModelConfig, evaluate, generate_networks
from metanet.network import GenerateError, generate
from metanet.tasks import Episode
from test_images import QUICK, make_folder, run_cli


def _features(b=2, ways=3, shots=2, queries=4, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(b, ways * shots, c, generator=g, dtype=torch.float64)
    y = torch.arange(ways).repeat(shots).expand(b, -1).contiguous()  # interleaved classes
    query = torch.randn(b, queries, c, generator=g, dtype=torch.float64)
    return support, y, query


def test_matching_gradients_stay_finite_for_a_class_without_support() -> None:
    head = MatchingHead(5).double()
    support, y, query = _features()
    support.requires_grad_(True)
    head(support, y, query, 4).logsumexp(-1).sum().backward()  # class 3 has no example
    assert torch.isfinite(support.grad).all() and torch.isfinite(head.log_scale.grad)


def test_matching_attention_equals_a_direct_computation() -> None:
    head = MatchingHead(5).double()
    support, y, query = _features()
    logits = head(support, y, query, 3)
    scale = head.log_scale.exp().item()
    for b in range(2):
        for q in range(4):
            cos = torch.stack([F.cosine_similarity(query[b, q], s, dim=0) for s in support[b]])
            attention = torch.softmax(scale * cos, 0)
            for c in range(3):
                p = sum(attention[i] for i in range(len(y[b])) if y[b, i] == c)
                assert logits[b, q, c].item() == pytest.approx(math.log(p), rel=1e-10)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(2, 4, dtype=torch.float64))  # log-probabilities


def test_relation_scores_equal_a_direct_computation() -> None:
    torch.manual_seed(0)
    head = RelationHead(5, hidden=7).double()
    support, y, query = _features()
    scores = head(support, y, query, 3)
    w1, b1, w2, b2 = head.relation[0].weight, head.relation[0].bias, head.relation[2].weight, head.relation[2].bias
    for b in range(2):
        for q in range(4):
            for c in range(3):
                cls = support[b][y[b] == c].mean(0)  # the class feature: the mean over its shots
                pair = torch.cat([query[b, q], cls])
                expected = w2 @ torch.relu(w1 @ pair + b1) + b2
                assert scores[b, q, c].item() == pytest.approx(expected.item(), rel=1e-10)


def test_memory_read_and_write_against_a_hand_computed_two_step_example() -> None:
    """Three slots of width 2, gate 0 (half previous read, half least used), gamma 0.95."""
    head = MemoryHead(1, 2, slots=3, width=2).double()
    like = torch.zeros(1, dtype=torch.float64)
    state = {k: v for k, v in head.initial(1, like).items()}
    zero = torch.zeros(1, 1, dtype=torch.float64)
    e = math.e
    # step 1: key (1, 0). Least used: slot 0 (all unused, the first); write 0.5 there.
    state = head.memory_step(state, torch.tensor([[1.0, 0.0]], dtype=torch.float64), zero)
    torch.testing.assert_close(state["memory"][0], torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    r1 = torch.tensor([e, 1.0, 1.0], dtype=torch.float64) / (e + 2)  # softmax of cosines (1, 0, 0)
    torch.testing.assert_close(state["read_w"][0], r1)
    torch.testing.assert_close(state["usage"][0], r1 + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    # step 2: key (0, 1). Least used: slot 1 (1/(e+2), the first of the two equal ones).
    state = head.memory_step(state, torch.tensor([[0.0, 1.0]], dtype=torch.float64), zero)
    write = 0.5 * r1 + 0.5 * torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    expected[:, 1] += write
    torch.testing.assert_close(state["memory"][0], expected)
    cos = torch.tensor([write[0] / math.hypot(0.5, write[0]), 1.0, 1.0], dtype=torch.float64)
    r2 = torch.softmax(cos, 0)
    torch.testing.assert_close(state["read_w"][0], r2)
    torch.testing.assert_close(state["usage"][0], 0.95 * (r1 + torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)) + r2 + write)
    _, read = head.read(state["memory"], torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(read[0], r2 @ expected)
    torch.testing.assert_close(state["read"], read)  # the read vector the controller gets next
    # step 3: the least-used slot (now written) is cleared before the write, others add to
    usage = state["usage"][0]
    lu = int(usage.argmin())
    assert expected[lu].abs().sum() > 0  # a slot with content
    key = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    before = state["memory"][0].clone()
    state = head.memory_step(state, key, zero)
    write = 0.5 * r2 + 0.5 * torch.nn.functional.one_hot(torch.tensor(lu), 3).double()
    after = before + write[:, None] * key[0]
    after[lu] = write[lu] * key[0]  # the old content is gone
    torch.testing.assert_close(state["memory"][0], after)


def test_the_memory_network_learns_a_toy_episode_task() -> None:
    """3-way 1-shot episodes of fresh random class vectors (so nothing but binding within
    the episode helps): the memory network must learn to bind labels to samples."""
    torch.manual_seed(0)
    head = MemoryHead(8, 3, hidden=32, slots=8, width=16)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)

    def episode(b: int):
        classes = torch.randn(b, 3, 8)
        order = torch.stack([torch.randperm(3) for _ in range(b)])
        support = torch.gather(classes, 1, order[..., None].expand(-1, -1, 8))
        query_y = torch.randint(0, 3, (b, 6))
        query = torch.gather(classes, 1, query_y[..., None].expand(-1, -1, 8)) + 0.1 * torch.randn(b, 6, 8)
        return support, order, query, query_y

    for _ in range(400):
        s, y, q, qy = episode(32)
        loss = F.cross_entropy(head(s, y, q, 3).flatten(0, 1), qy.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    s, y, q, qy = episode(200)
    with torch.no_grad():
        accuracy = (head(s, y, q, 3).argmax(-1) == qy).float().mean().item()
    assert accuracy > 0.8, accuracy  # chance: 1/3


def test_make_head_and_the_model_refuse_what_they_cannot_do() -> None:
    with pytest.raises(ValueError, match="head must be one of linear, matching, relation, memory"):
        make_head("attention", 4, 2)
    with pytest.raises(ValueError, match="classifies; space 'mlp_regression' is for regression"):
        MetaNet(spaces.load("mlp_regression"), 0, ModelConfig(head="matching"))
    model = MetaNet(spaces.load("tiny"), 0, ModelConfig(head="memory"))
    with pytest.raises(ValueError, match="memory head is learned for 3-way tasks"):
        model.check_ways(5)
    MetaNet(spaces.load("tiny"), 0, ModelConfig(head="matching")).check_ways(5)  # any number of ways
    with pytest.raises(ConfigError, match="head relation compares queries with the support set and has no inner loop"):
        TrainConfig(space="tiny", tasks="images", head="relation", inner_steps=1, eval_inner_steps=0)
    with pytest.raises(ConfigError, match="reptile's update comes from inner steps"):
        TrainConfig(space="tiny", tasks="images", head="matching", inner_steps=0, eval_inner_steps=0, order="reptile")


@pytest.mark.parametrize("head", ["matching", "relation", "memory"])
def test_an_episodic_head_evaluates_as_it_trains_and_has_no_inner_loop(head: str) -> None:
    torch.manual_seed(0)
    tiny = spaces.load("tiny")
    genotype = discretise(tiny, torch.randn(MetaNet(tiny, 0, ModelConfig(arch="shared")).arch.shape))  # some fixed architecture
    model = MetaNet(tiny, 0, ModelConfig(arch="fixed", weights="off", head=head), genotype=genotype).double()
    g = torch.Generator().manual_seed(0)
    ep = Episode(torch.randn(2, 6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3).repeat(2).expand(2, 6).contiguous(),
                 torch.randn(2, 9, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(3).repeat(3).expand(2, 9).contiguous())
    scores = evaluate(model, [ep], [0, 1, 10])
    assert scores[0]["n"] == 2
    # the evaluation path (each task's discrete network) and the batched supernet path
    # of training give the same logits, hence the same accuracy
    gen = model.generate(ep.support_x, ep.support_y)
    batched = model.predict_query(gen.alpha, gen.params, ep)
    for b, net in enumerate(generate_networks(model, ep)):
        sf, qf = (forward_genotype(model.plan, net.genotype, net.params, x[b], features=True) for x in (ep.support_x, ep.query_x))
        torch.testing.assert_close(model.head(sf[None], ep.support_y[b][None], qf[None], 3)[0], batched[b])
    accuracy = (batched.argmax(-1) == ep.query_y).double().mean().item()
    assert accuracy == pytest.approx(scores[0]["mean"])
    with pytest.raises(ValueError, match="has no inner loop"):
        model.adapt(gen, ep.support_x, ep.support_y, 1, create_graph=True)


@pytest.mark.parametrize("head", ["matching", "relation", "memory"])
def test_cli_trains_and_evaluates_an_episodic_head_and_generate_refuses_it(head, tmp_path, capsys) -> None:
    root = make_folder(tmp_path / "data", classes=20, per_class=4, mode="L", size=12)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--tasks", "images", "--data-root", root, "--space", "tiny", "--arch", "shared", "--weights", "off", "--head", head,
                            "--inner-steps", "0", "--eval-inner-steps", "0", "--ways", "3", "--shots", "1", "--queries", "1", *QUICK, "--out", run], capsys)
    assert code == 0, err
    ways = "3" if head == "memory" else "4"
    code, out, err = run_cli(["evaluate", run, "--split", "all", "--ways", ways, "--shots", "1", "--queries", "1", "--episodes", "3"], capsys)
    assert code == 0, err
    line = json.loads(out)
    assert line["ways"] == int(ways) and 0.0 <= line["accuracy"] <= 1.0
    if head == "memory":  # a learned per-class output: other ways are refused in one line
        code, _, err = run_cli(["evaluate", run, "--split", "all", "--ways", "4", "--episodes", "2"], capsys)
        assert code == 2 and err.count("\n") == 1 and "cannot classify 4-way" in err
    with pytest.raises(GenerateError, match="no standalone network to emit"):
        generate(str(run), torch.randn(3, 1, 8, 8), torch.arange(3))
