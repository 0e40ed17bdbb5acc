import numpy as np
import pytest
import torch

from deltamask.fl.training import evaluate, train_scores
from deltamask.model.masking import MaskedNetwork, logit
from deltamask.model.backbones import load_model


@pytest.fixture(scope="module")
def net() -> MaskedNetwork:
    torch.manual_seed(0)
    return MaskedNetwork(load_model("timm:test_efficientnet", "random"), num_classes=4, masked_blocks=2)


def test_selection_counts_only_weight_matrices(net: MaskedNetwork) -> None:
    params = dict(net.backbone.root.named_parameters())
    assert net.masked_names
    assert all(".bias" not in n and "bn" not in n for n in net.masked_names)
    assert net.num_masked == sum(int(np.prod(s)) for s in net.shapes)
    assert net.num_masked < net.num_backbone_params
    assert net.first_masked_stage > 0
    assert len(params) > 0


def test_gradients_reach_scores_not_weights(net: MaskedNetwork) -> None:
    torch.nn.init.normal_(net.head.weight)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        h = net.prefix(x)
    net.set_scores_from_probs(torch.full((net.num_masked,), 0.7), 0.01)
    net.scores.requires_grad_(True)
    net.scores.grad = None
    net.use_sampled_mask(torch.Generator().manual_seed(0))
    loss = net.forward_from_prefix(h).logsumexp(1).mean()
    loss.backward()
    assert net.scores.grad is not None and net.scores.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(not p.requires_grad for p in net.backbone.parameters())
    net.use_fixed_mask(None)
    net.scores.requires_grad_(False)


def test_mask_changes_output_and_all_ones_is_identity(net: MaskedNetwork) -> None:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        h = net.prefix(x)
        net.use_fixed_mask(None)
        base = net.features(h)
        net.use_fixed_mask(torch.ones(net.num_masked))
        ones = net.features(h)
        net.use_fixed_mask(torch.zeros(net.num_masked))
        zeros = net.features(h)
        net.use_fixed_mask(None)
    assert torch.equal(base, ones)
    assert not torch.allclose(base, zeros)


def test_eps_clipping_keeps_scores_finite() -> None:
    s = logit(torch.tensor([0.0, 1.0, 0.5]), 0.01)
    assert torch.isfinite(s).all()
    assert torch.allclose(torch.sigmoid(s), torch.tensor([0.01, 0.99, 0.5]))


def test_training_moves_scores_and_keeps_weights(net: MaskedNetwork) -> None:
    before = {n: p.clone() for n, p in net.backbone.root.named_parameters()}
    torch.nn.init.normal_(net.head.weight)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 4, (32,))
    with torch.no_grad():
        h = net.prefix(x)
    theta_g = torch.full((net.num_masked,), 0.9)
    res = train_scores(net, theta_g, h, y, epochs=2, batch_size=8, lr=0.1, eps=0.01,
                       shuffle_gen=torch.Generator().manual_seed(0), mask_gen=torch.Generator().manual_seed(1))
    assert res.steps == 8
    assert not torch.allclose(res.theta, theta_g)
    assert ((res.theta >= 0.01) & (res.theta <= 0.99)).all()
    for n, p in net.backbone.root.named_parameters():
        assert torch.equal(p, before[n]), n
    acc, loss = evaluate(net, h, y, res.theta >= 0.5)
    assert 0.0 <= acc <= 1.0 and np.isfinite(loss)


def test_regex_selection_and_errors() -> None:
    from deltamask.model.backbones import ModelError

    lm = load_model("timm:test_vit", "random")
    net = MaskedNetwork(lm, 3, mask_pattern=r"blocks\.\d+\.mlp\.fc1\.weight")
    assert all("mlp.fc1.weight" in n for n in net.masked_names)
    with pytest.raises(ModelError, match="matches no weight"):
        MaskedNetwork(load_model("timm:test_vit", "random"), 3, mask_pattern="nothing_here")
    with pytest.raises(ModelError, match="only"):
        MaskedNetwork(load_model("timm:test_vit", "random"), 3, masked_blocks=99)
