"""roles: where a GEMM input comes from decides its scheme, by role rather than by op identity."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import zqhero_fx
from tests.passes._util import pipeline_until
from zqhero_fx.formats import Scheme
from zqhero_fx.passes._graph import LINEAR
from zqhero_fx.passes.roles import Role, gemm_input_scheme, role


class _Shapes(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.rms = nn.LayerNorm(8), nn.RMSNorm(8)
        self.a, self.gate, self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.after_cumsum, self.pooled = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(self.norm(x))  # TWQ: a LayerNorm's rows
        g = self.rms(h)
        mlp = self.down(F.silu(self.gate(g)) * self.up(g))  # gate/up TWQ from RMSNorm; down FWQ through SiLU·mul
        odd = self.after_cumsum(torch.cumsum(mlp, dim=1))  # no scheme: a cumsum is no GEMM, no norm
        first = self.pooled(self.norm(odd)[:, 0])  # TWQ: the norm's first row (a pooler)
        return odd, first


def test_schemes_and_reasons_by_role():
    gm = zqhero_fx.trace(_Shapes().eval(), (torch.randn(2, 5, 8),))
    canonical, _, _ = pipeline_until(gm, "fp", None, "classify")
    found = {}
    for node in canonical.graph.nodes:
        if node.target is LINEAR:
            name = node.args[1].target.rsplit(".", 1)[0]
            found[name] = gemm_input_scheme(node)
    assert found["a"] == (Scheme.TWQ, "")
    assert found["gate"] == (Scheme.TWQ, "") and found["up"] == (Scheme.TWQ, "")
    assert found["down"] == (Scheme.FWQ, "")
    assert found["after_cumsum"][0] is None and "aten.cumsum" in found["after_cumsum"][1]
    assert found["pooled"] == (Scheme.TWQ, "")
    assert {role(n) for n in canonical.graph.nodes if n.target is torch.ops.aten.rms_norm.default} == {Role.NORM}
