"""Each method's loss copies out of the suite: the function the README's "Copying a loss" table names, executed from
its source in a fresh namespace that holds only torch and the pieces the table lists (each from its source too),
gives the method's own output. A piece missing from the table fails here with a NameError."""
import inspect
import math
import textwrap
import types

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import common
import joimternet
import lovt
import lrclr
import place
import reclf

MODULES = dict(common=common, lovt=lovt, joimternet=joimternet, lrclr=lrclr, reclf=reclf, place=place)
IMPORTS = dict(F=torch.nn.functional, math=math, checkpoint=checkpoint)

# The README's table: method -> (the function to copy, everything it needs besides torch). "F" is
# torch.nn.functional, "math" the standard module, "checkpoint" torch.utils.checkpoint.checkpoint; "module.name" a
# function copied from that file.
COPY = {
    "lovt": ("lovt.lovt_loss", ["F", "math", "common.fp32", "common.contrastive_ce", "lovt.spatial_target",
                                "lovt.local_intra_contrastive", "lovt.local_weights"]),
    "joimternet": ("joimternet.joimternet_loss", [
        "F", "checkpoint", "common.fp32", "common.cosine", "common.contrastive_ce", "common.word_region_attention",
        "common.word_region_score", "common.word_region_matrix", "common.report_chunks", "joimternet.global_ce",
        "joimternet.local_ce", "joimternet.triplet_terms"]),
    "lrclr": ("lrclr.lrclr_loss", ["F", "common.fp32", "common.contrastive_ce", "lrclr.symmetric_ce"]),
    "reclf": ("reclf.reclf_loss", ["F", "common.contrastive_ce", "reclf.pair_ce"]),
    "place": ("place.place_loss", ["F", "common.fp32", "common.contrastive_ce", "common.mgca_tca",
                                   "common._clipped_weights", "common._weighted_diagonal_ce", "place.ita_loss",
                                   "place.pcma_loss", "place.patch_correlation", "place.cce_loss"]),
}


def fresh_copy(function, pieces):
    """The function and its pieces exec'd from source into one namespace holding torch and nothing else; pieces
    from common.py are also reachable as common.<name>, the way the method files call them."""
    namespace = {"torch": torch}
    for piece in pieces + [function]:
        if piece in IMPORTS:
            namespace[piece] = IMPORTS[piece]
            continue
        module, name = piece.split(".")
        exec(textwrap.dedent(inspect.getsource(getattr(MODULES[module], name))), namespace)
        if module == "common":
            setattr(namespace.setdefault("common", types.SimpleNamespace()), name, namespace[name])
    return namespace[function.split(".")[1]]


def lovt_inputs(g):
    B, N, S, d = 3, 4, 3, 8
    r = lambda *shape: torch.randn(*shape, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    return dict(global_a=r(B, d), global_b=r(B, d), local_a=r(B, N, d), att_a=r(B, N, d), local_b=r(B, S, d),
                att_b=r(B, S, d), sentence_mask=mask, pool_a=r(B, N).softmax(-1), pool_b=r(B, S).softmax(-1),
                grid=(2, 2))


def joimternet_inputs(g):
    B, R, L, D = 4, 6, 5, 8
    r = lambda *shape: torch.randn(*shape, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False], [True] * 2 + [False] * 3])
    return dict(v=r(B, D), V=r(B, R, D), e=r(B, D), E=r(B, L, D), M=mask, neg=torch.tensor([1, 2, 3, 0]))


def lrclr_inputs(g):
    B, D, N = 4, 8, 6
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    g_img, u_txt = unit(B, D), unit(B, D)
    return dict(g=g_img, u=u_txt, g_all=g_img, u_all=u_txt, logit_scale=torch.tensor(14.3),
                local_rows=torch.randn(B, B, generator=g), local_cols=torch.randn(B, B, generator=g),
                gates=torch.rand(B, N, generator=g), lambda_loc=1.0, mu_sparsity=0.1)


def reclf_inputs(g):
    r = lambda: torch.randn(4, 4, generator=g)
    return dict(global_rows=r(), global_cols=r(), rel_rows=r().sigmoid(), rel_cols=r().sigmoid(), lse_rows=r(),
                lse_cols=r())


def place_inputs(g):
    B, N, T, E, K = 3, 4, 5, 8, 2
    r = lambda *shape: torch.randn(*shape, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, True, False, False, False]])
    return dict(image_emb=r(B, E), text_emb=r(B, E), patch_emb=r(B, N, E), word_emb=r(B, T, E), word_mask=mask,
                word_weights=r(B, T).softmax(-1) * mask, patch_weights=r(B, N).softmax(-1), v=r(B, K, E),
                u=r(B, K, E), cce_tokens=(r(B, N, 6), r(B, N, E)))


INPUTS = dict(lovt=lovt_inputs, joimternet=joimternet_inputs, lrclr=lrclr_inputs, reclf=reclf_inputs,
              place=place_inputs)


@pytest.mark.parametrize("method", sorted(COPY))
def test_the_copied_loss_equals_the_methods_own(method):
    function, pieces = COPY[method]
    copied = fresh_copy(function, pieces)
    inputs = INPUTS[method](torch.Generator().manual_seed(0))
    own = getattr(MODULES[method], function.split(".")[1])(**inputs)
    out = copied(**inputs)
    assert set(out) == set(own) and "loss" in out
    for name, value in own.items():
        assert torch.equal(out[name], value), name
    assert torch.isfinite(out["loss"])


def test_a_piece_left_out_of_the_table_fails():
    function, pieces = COPY["place"]
    with pytest.raises(NameError):
        fresh_copy(function, [p for p in pieces if p != "place.pcma_loss"])(**place_inputs(torch.Generator()))
