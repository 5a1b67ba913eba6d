"""Every registered loss against a plain float64 reference written here, plus identities."""

from __future__ import annotations

import math

import pytest
import torch

from stratos.distill.losses import LOSSES, get_loss, register_loss


def ref_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def ref_loss(name, p, q, label, **kw):
    """Written from the definitions, one row at a time, in Python floats."""
    if name == "fkl":
        return ref_kl(p, q)
    if name == "rkl":
        return ref_kl(q, p)
    if name == "jsd":
        b = kw.get("beta", 0.5)
        m = [b * pi + (1 - b) * qi for pi, qi in zip(p, q)]
        return b * ref_kl(p, m) + (1 - b) * ref_kl(q, m)
    if name == "skl":
        a = kw.get("alpha", 0.1)
        return ref_kl(p, [a * pi + (1 - a) * qi for pi, qi in zip(p, q)])
    if name == "srkl":
        a = kw.get("alpha", 0.1)
        return ref_kl(q, [a * qi + (1 - a) * pi for pi, qi in zip(p, q)])
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if name == "akl":
        mu = kw.get("mu", 0.5)
        order = sorted(range(len(p)), key=lambda i: p[i])  # ascending teacher probability
        cum, head, tail = 0.0, 0.0, 0.0
        for i in order:
            cum += p[i]
            if cum < mu:
                tail += abs(p[i] - q[i])
            else:
                head += abs(p[i] - q[i])
        return head / (head + tail) * ref_kl(p, q) + tail / (head + tail) * ref_kl(q, p)
    if name == "ce":
        return -math.log(q[label])
    raise AssertionError(name)


def softmax_rows(x):
    return torch.softmax(x, dim=-1).tolist()


CASES = [("fkl", {}), ("rkl", {}), ("jsd", {}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9}), ("skl", {}),
         ("skl", {"alpha": 0.3}), ("srkl", {}), ("srkl", {"alpha": 0.3}), ("tvd", {}), ("akl", {}), ("akl", {"mu": 0.3}), ("ce", {})]


def test_every_registered_loss_has_a_reference_case():
    assert {name for name, _ in CASES} == set(LOSSES) - {"test_custom"}


@pytest.mark.parametrize("name,kw", CASES)
def test_loss_matches_float64_reference(name, kw):
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    t_logits = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (6,), generator=g)
    got = get_loss(name).fn(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1), labels, **kw)
    assert got.shape == (6,)
    for row, (p, q) in enumerate(zip(softmax_rows(t_logits), softmax_rows(s_logits))):
        assert got[row].item() == pytest.approx(ref_loss(name, p, q, labels[row].item(), **kw), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "skl", "srkl", "tvd", "akl"])
def test_divergences_are_zero_at_equality_and_nonnegative(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 17, generator=g, dtype=torch.float64) * 3
    logp = torch.log_softmax(x, -1)
    labels = torch.zeros(8, dtype=torch.long)
    fn = get_loss(name).fn
    assert torch.allclose(fn(logp, logp.clone(), labels), torch.zeros(8, dtype=torch.float64), atol=1e-12)
    other = torch.log_softmax(torch.randn(8, 17, generator=g, dtype=torch.float64) * 3, -1)
    assert (fn(other, logp, labels) >= -1e-12).all()
    assert (fn(other, logp, labels) > 1e-6).all()


def test_jsd_half_is_symmetric_and_tvd_at_most_one():
    g = torch.Generator().manual_seed(2)
    a = torch.log_softmax(torch.randn(16, 9, generator=g, dtype=torch.float64) * 5, -1)
    b = torch.log_softmax(torch.randn(16, 9, generator=g, dtype=torch.float64) * 5, -1)
    jsd = get_loss("jsd").fn
    assert torch.allclose(jsd(a, b, None, beta=0.5), jsd(b, a, None, beta=0.5), atol=1e-12)
    assert (jsd(a, b, None) <= math.log(2) + 1e-12).all()
    tvd = get_loss("tvd").fn
    # Disjoint supports are the extreme case: TVD reaches exactly 1.
    p = torch.log(torch.tensor([[1.0, 1e-300, 1e-300]], dtype=torch.float64))
    q = torch.log(torch.tensor([[1e-300, 0.5, 0.5]], dtype=torch.float64))
    assert tvd(q, p, None).item() == pytest.approx(1.0)
    assert (tvd(a, b, None) <= 1.0).all()


def test_skew_kl_with_zero_alpha_is_plain_kl():
    g = torch.Generator().manual_seed(3)
    a = torch.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    b = torch.log_softmax(torch.randn(4, 7, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(get_loss("skl").fn(a, b, None, alpha=0.0), get_loss("fkl").fn(a, b, None))
    assert torch.allclose(get_loss("srkl").fn(a, b, None, alpha=0.0), get_loss("rkl").fn(a, b, None))


def test_users_register_their_own_loss():
    @register_loss("test_custom")
    def squared(s_logp, t_logp, labels, *, w=1.0):
        return w * ((s_logp.exp() - t_logp.exp()) ** 2).sum(-1)

    try:
        from stratos.spec import DistillSpec

        assert DistillSpec(loss="test_custom").loss == "test_custom"
        x = torch.log_softmax(torch.randn(3, 5), -1)
        assert get_loss("test_custom").fn(x, x, None, w=2.0).abs().max() == 0
    finally:
        LOSSES.pop("test_custom")
