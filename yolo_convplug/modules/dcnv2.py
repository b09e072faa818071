"""DCNv2: modulated deformable convolution (Zhu, Hu, Lin, Dai, "Deformable ConvNets v2: More Deformable, Better
Results", CVPR 2019, arXiv:1811.11168)."""

from __future__ import annotations

import torch
import torch.nn as nn
from ultralytics.nn.modules.conv import autopad

from ..registry import register
from ._deform import deform_conv
from ._stock import copy_bn, stock_conv_bn
from ._utils import check_conv_args, fuse_own_bn, require, require_int, resolve_act


def _dcnv2_macs(m, x, y):
    """thop rule for the modulated deformable convolution, which thop does not see (a ``deform_conv2d`` call).

    ``k * k * c1 / g`` MACs per output value for the convolution, plus, per output position, the bilinear sampling
    (4 MACs) and modulation (1) of each of its ``k * k * c1`` sampled values. The offset/mask convolution is a module
    that thop counts itself.
    """
    conv = m.conv
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    m.total_ops += y.numel() * conv.weight[0].numel() + 5 * y[:, 0].numel() * conv.in_channels * taps


@register(role="conv", macs=_dcnv2_macs, paper="Deformable ConvNets v2, Zhu, Hu, Lin, Dai, CVPR 2019")
class DCNv2(nn.Module):
    """Modulated deformable convolution followed by BatchNorm and activation, Ultralytics ``Conv`` convention.

    With ``p_k`` the k*k taps of a ``k x k`` kernel of dilation ``d`` and ``p`` an output position (stride ``s``)::

        o, l = split(conv_om(x))                      # conv_om: c1 -> 3·dg·k·k (same k, s, p, d); o: 2·dg·k·k
        m    = 2·sigmoid(l)                           # modulation per tap and offset group, in (0, 2)
        y(p) = sum_k W_k · m_k(p) · x(p + p_k + o_k(p))  # x(.) bilinear, zero outside the map
        out  = act(BN(y))

    computed by torchvision's ``deform_conv2d`` (mmcv's offset layout: (dy, dx) per tap; each of the ``dg`` offset
    groups moves its own ``c1/dg`` input channels). ``conv_om`` starts at zero, as in the paper: offsets 0 and a
    constant modulation, so a fresh module computes a plain convolution with its kernel ``conv.weight`` (the same
    initial values as a ``Conv``'s under the same seed). The paper's modulation is ``sigmoid(l)``, 0.5 at the start;
    ``2·sigmoid`` is that with the kernel doubled (the same functions), chosen so that the kernel *is* the plain
    convolution's and the warm start copies it unchanged.

    ``fuse()`` folds BN into the kernel and a bias (exact: the modulated sampling is linear in the kernel); the
    offset/mask convolution stays. Exports to ONNX ``DeformConv`` (opset >= 19).

    Warm start: ``convert_from(conv)`` copies the stock kernel and BN and zeroes ``conv_om``: exactly the stock layer.

    Args:
        c1 (int): Input channels.
        c2 (int): Output channels.
        k (int): Kernel size.
        s (int): Stride.
        p (int | None): Padding, ``autopad(k, p, d)`` when None.
        g (int): Groups of the convolution; must divide c1 and c2.
        d (int): Dilation.
        act (bool | nn.Module): Activation, Ultralytics convention.
        deformable_groups (int): Offset groups ``dg`` (mmcv's ``deform_groups``); must divide c1.
    """

    conversion_error = 1e-5  # exact: zero offsets sample the grid, modulation 1, the stock kernel and BN

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1, d=1, act=True, deformable_groups=1):
        """Build the kernel, the zero-initialised offset/mask convolution, BN and the activation."""
        super().__init__()
        name = type(self).__name__
        check_conv_args(name, c1, c2, k, s, p, g, d)
        require_int(name, "deformable_groups", deformable_groups)
        require(c1 % deformable_groups == 0, name, "deformable_groups", deformable_groups,
                f"it must divide c1={c1}")
        self.deformable_groups = deformable_groups
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), dilation=d, groups=g, bias=False)  # kernel holder
        self.conv_om = nn.Conv2d(c1, 3 * deformable_groups * k * k, k, s, autopad(k, p, d), dilation=d)
        self.bn = nn.BatchNorm2d(c2)
        self.act = resolve_act(act)
        self.reset_offsets()

    def reset_offsets(self):
        """Zero the offset/mask convolution: offsets 0 and modulation 1, a plain convolution."""
        nn.init.zeros_(self.conv_om.weight)
        nn.init.zeros_(self.conv_om.bias)

    def modulated_conv(self, x):
        """The modulated deformable convolution ``y`` (plus the kernel's bias once fused)."""
        conv, om = self.conv, self.conv_om
        # at its parameters' precision even under autocast: the offsets' gradient (x's spatial gradient times the
        # output's, summed over channels) overflows float16
        with torch.autocast(x.device.type, enabled=False):
            offset, logits = om(x.to(om.weight.dtype)).split([2 * om.out_channels // 3, om.out_channels // 3], 1)
        return deform_conv(x, offset, conv.weight, conv.stride, conv.padding, conv.dilation, 2 * logits.sigmoid(),
                           conv.bias)

    def forward(self, x):
        """Apply the modulated deformable convolution, BN and the activation."""
        return self.act(self.bn(self.modulated_conv(x)))

    def forward_fuse(self, x):
        """Apply the modulated deformable convolution with BN folded into its kernel, then the activation."""
        return self.act(self.modulated_conv(x))

    def fuse(self):
        """Fold BN into the kernel and a bias (exact), delete BN, switch ``forward`` to ``forward_fuse``."""
        return fuse_own_bn(self)

    def convert_from(self, stock: nn.Module) -> str:
        """Warm start from an Ultralytics ``Conv`` of the same geometry and activation: its kernel and BN (statistics,
        ``eps``, ``momentum``), zero offsets and modulation 1, so the layer computes exactly the stock function.

        Raises:
            ConversionError: a fused stock layer, or one of another geometry or activation.
        """
        conv, bn = stock_conv_bn(type(self).__name__, stock, self.conv, self.act)
        self.conv.weight.data.copy_(conv.weight.data)
        copy_bn(self.bn, bn)
        self.reset_offsets()
        return "exact: the stock kernel and BN, zero offsets, modulation 1"
