"""PyTorch twins of the nets `lpe.models.from_torch` converts, for the tests only.

Minimal `nn.Module`s written from the published architectures with the same module names (so the
same `state_dict` keys) as RepDistiller's `models/resnet.py`, `resnetv2.py`, `wrn.py`, `vgg.py` and
torchvision's `resnet18/34/50` and `mobilenet_v2`, so the converter can be checked against a real
PyTorch forward pass without either package. They are written independently of lpe's Flax
models on purpose: a test compares two implementations, not one with itself.

Every twin's `forward(x)` takes NCHW images and returns `(logits, embedding)`, the embedding being
the pooled vector before the classifier. Global average pooling stands in for RepDistiller's fixed
`AvgPool2d(8)` / `avg_pool2d(out, 8)`, which is the same thing on the 32x32 images the tests use.
Import this module only after `pytest.importorskip('torch')`.
"""

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's MobileNetV2 groups: (expansion t, channels c, repeats n, first stride s).
MOBILENET_V2_GROUPS = [
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
]
# RepDistiller's VGG configurations (conv widths per block); vgg13 is config 'B'.
VGG_BLOCKS = {
  8: [[64], [128], [256], [512], [512]],
  13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def _bn(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels)  # eps 1e-5, momentum 0.1: both sources use the defaults.


class ResidualBlock(nn.Module):
  """A post-activation basic (3x3, 3x3) or bottleneck (1x1, 3x3 strided, 1x1 x4) block.

  The projection (1x1 conv + BN, when the stride or width changes) is registered as
  `shortcut_name`: 'downsample' in RepDistiller's resnet.py and torchvision, 'shortcut' in
  RepDistiller's resnetv2.py.
  """

  def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool, shortcut_name: str):
    super().__init__()
    self.bottleneck = bottleneck
    cout = planes * (4 if bottleneck else 1)
    if bottleneck:
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = _bn(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = _bn(planes)
      self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
      self.bn3 = _bn(cout)
    else:
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = _bn(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = _bn(planes)
    self.shortcut_name = shortcut_name
    if stride != 1 or cin != cout:
      projection = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
      setattr(self, shortcut_name, projection)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    if self.bottleneck:
      out = F.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
    else:
      out = self.bn2(self.conv2(out))
    projection = getattr(self, self.shortcut_name, None)
    return F.relu(out + (x if projection is None else projection(x)))


class ResNet(nn.Module):
  """RepDistiller's CIFAR ResNets (3x3 stem) and torchvision's ResNets (7x7/2 stem + max pool)."""

  def __init__(
    self,
    *,
    imagenet_stem: bool,
    stem_width: int,
    widths: list[int],
    blocks: list[int],
    bottleneck: bool,
    shortcut_name: str,
    classifier_name: str,
    num_classes: int,
  ):
    super().__init__()
    self.imagenet_stem = imagenet_stem
    if imagenet_stem:
      self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, stem_width, 3, 1, 1, bias=False)
    self.bn1 = _bn(stem_width)
    cin = stem_width
    self.stages = []
    for i, (planes, n) in enumerate(zip(widths, blocks, strict=True)):
      layers = []
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        layers.append(ResidualBlock(cin, planes, stride, bottleneck, shortcut_name))
        cin = planes * (4 if bottleneck else 1)
      setattr(self, f'layer{i + 1}', nn.Sequential(*layers))
      self.stages.append(f'layer{i + 1}')
    self.classifier_name = classifier_name
    setattr(self, classifier_name, nn.Linear(cin, num_classes))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    for stage in self.stages:
      x = getattr(self, stage)(x)
    embedding = x.mean(dim=(2, 3))
    return getattr(self, self.classifier_name)(embedding), embedding


def repdistiller_resnet(depth: int, widths: list[int], num_classes: int) -> ResNet:
  """RepDistiller's `ResNet(depth, widths, 'basicblock')`: resnet56 is (56, [16, 16, 32, 64])."""
  n = (depth - 2) // 6
  return ResNet(
    imagenet_stem=False,
    stem_width=widths[0],
    widths=widths[1:],
    blocks=[n, n, n],
    bottleneck=False,
    shortcut_name='downsample',
    classifier_name='fc',
    num_classes=num_classes,
  )


def repdistiller_resnet50(num_classes: int) -> ResNet:
  """RepDistiller's resnetv2 `ResNet50`: 3x3 stem of 64, bottlenecks 3-4-6-3, `linear`."""
  return ResNet(
    imagenet_stem=False,
    stem_width=64,
    widths=[64, 128, 256, 512],
    blocks=[3, 4, 6, 3],
    bottleneck=True,
    shortcut_name='shortcut',
    classifier_name='linear',
    num_classes=num_classes,
  )


def torchvision_resnet(depth: int, num_classes: int) -> ResNet:
  """torchvision's `resnet18`, `resnet34` or `resnet50`."""
  blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
  return ResNet(
    imagenet_stem=True,
    stem_width=64,
    widths=[64, 128, 256, 512],
    blocks=blocks,
    bottleneck=depth == 50,
    shortcut_name='downsample',
    classifier_name='fc',
    num_classes=num_classes,
  )


class WideBlock(nn.Module):
  """Pre-activation BN-ReLU-conv x2; a width change projects the *activated* input."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = _bn(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = _bn(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if cin != cout else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    activated = F.relu(self.bn1(x))
    out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
    return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideStage(nn.Module):
  """RepDistiller's `NetworkBlock`: the blocks live in `.layer`."""

  def __init__(self, n: int, cin: int, cout: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(
      *[WideBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer(x)


class WideResNet(nn.Module):
  """RepDistiller's WRN-depth-k: stem of 16, three stages, final BN-ReLU, `fc`."""

  def __init__(self, depth: int, widen_factor: int, num_classes: int):
    super().__init__()
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.block1 = WideStage(n, widths[0], widths[1], 1)
    self.block2 = WideStage(n, widths[1], widths[2], 2)
    self.block3 = WideStage(n, widths[2], widths[3], 2)
    self.bn1 = _bn(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    embedding = F.relu(self.bn1(x)).mean(dim=(2, 3))
    return self.fc(embedding), embedding


class VGG(nn.Module):
  """RepDistiller's VGG-BN: `block{i}` = [conv (with bias), BN, ReLU, ..., conv, BN]."""

  def __init__(self, depth: int, num_classes: int):
    super().__init__()
    cin = 3
    for i, widths in enumerate(VGG_BLOCKS[depth]):
      layers = []
      for width in widths:
        layers += [nn.Conv2d(cin, width, 3, padding=1), _bn(width), nn.ReLU()]
        cin = width
      setattr(self, f'block{i}', nn.Sequential(*layers[:-1]))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pool_after = 4 if x.shape[2] == 64 else 3
    for i in range(5):
      x = F.relu(getattr(self, f'block{i}')(x))
      if i < pool_after:
        x = F.max_pool2d(x, 2, 2)
    embedding = x.mean(dim=(2, 3))
    return self.classifier(embedding), embedding


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
  """torchvision's `Conv2dNormActivation`: keys `.0.weight` (conv) and `.1.*` (BN)."""
  return nn.Sequential(
    nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
    _bn(cout),
    nn.ReLU6(),
  )


class InvertedResidual(nn.Module):
  """torchvision's block: `conv` = [expand (if t != 1), depthwise, project conv, project BN]."""

  def __init__(self, cin: int, cout: int, stride: int, expansion: int):
    super().__init__()
    hidden = cin * expansion
    layers = [_conv_bn_relu6(cin, hidden, 1, 1)] if expansion != 1 else []
    layers += [
      _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
      nn.Conv2d(hidden, cout, 1, bias=False),
      _bn(cout),
    ]
    self.conv = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
  """torchvision's `mobilenet_v2` at width 1.0: `features` 0..18, `classifier` [Dropout, Linear]."""

  def __init__(self, num_classes: int):
    super().__init__()
    layers = [_conv_bn_relu6(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s in MOBILENET_V2_GROUPS:
      for j in range(n):
        layers.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
        cin = c
    layers.append(_conv_bn_relu6(cin, 1280, 1, 1))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    embedding = self.features(x).mean(dim=(2, 3))
    return self.classifier(embedding), embedding


def randomize(model: nn.Module, seed: int) -> nn.Module:
  """Draws every weight and every BatchNorm running statistic at random; returns `model.eval()`.

  Convs get He-normal weights; BatchNorm scales, shifts, means and variances are drawn per
  channel, so a converter that mixes up any of them, or a transpose, changes the outputs.
  """
  generator = torch.Generator().manual_seed(seed)

  def draw(shape, low=None, high=None, std=None):
    if std is not None:
      return torch.randn(shape, generator=generator) * std
    return low + (high - low) * torch.rand(shape, generator=generator)

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(draw(module.weight.shape, std=(2.0 / fan_in) ** 0.5))
        if module.bias is not None:
          module.bias.copy_(draw(module.bias.shape, std=0.1))
      elif isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(draw(c, 0.5, 1.0))
        module.bias.copy_(draw(c, std=0.1))
        module.running_mean.copy_(draw(c, std=0.1))
        module.running_var.copy_(draw(c, 0.5, 2.0))
        module.num_batches_tracked.fill_(1000)
      elif isinstance(module, nn.Linear):
        module.weight.copy_(draw(module.weight.shape, std=module.in_features**-0.5))
        module.bias.copy_(draw(module.bias.shape, std=0.1))
  return model.eval()
