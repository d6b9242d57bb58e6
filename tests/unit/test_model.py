"""The backbone: local pretrained weights, the CIFAR stem, the width option, cross-rank BatchNorm."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from fgdist.config import ModelConfig
from fgdist.training.model import CrossRankBatchNorm2d, build_backbone, convert_batchnorm, reestimate_batchnorm

MARK = 12.375  # a value no initializer produces by chance


def test_missing_pretrained_file_is_a_clear_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "nope.pth" is relative: make sure it does not exist
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained.*nope\.pth"):
        build_backbone(ModelConfig(pretrained="nope.pth"))


def _saved_torchvision_resnet18(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer3.1.conv2.weight"][5, 7, 1, 2] = MARK
    state["conv1.weight"][0, 0, 3, 3] = -MARK
    state["layer4.1.bn2.running_mean"][11] = MARK
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_state_dict_loads_into_the_backbone(tmp_path):
    path, state = _saved_torchvision_resnet18(tmp_path)
    net = build_backbone(ModelConfig(stem="imagenet", pretrained=str(path)))
    got = net.state_dict()
    assert got["layer3.1.conv2.weight"][5, 7, 1, 2].item() == MARK
    assert got["conv1.weight"][0, 0, 3, 3].item() == -MARK
    assert got["layer4.1.bn2.running_mean"][11].item() == MARK
    for key, value in got.items():  # every backbone tensor is the file's (fc is dropped)
        assert torch.equal(value, state[key]), key
    assert isinstance(net.fc, nn.Identity)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_pretrained_with_cifar_stem_keeps_the_body_weights(tmp_path):
    path, _ = _saved_torchvision_resnet18(tmp_path)
    net = build_backbone(ModelConfig(stem="cifar", pretrained=str(path)))
    assert net.state_dict()["layer3.1.conv2.weight"][5, 7, 1, 2].item() == MARK
    assert net.conv1.kernel_size == (3, 3)  # the stem is replaced, so its weights are fresh


def test_pretrained_file_that_is_not_a_resnet18_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="other.pth"):
        build_backbone(ModelConfig(stem="imagenet", pretrained=str(path)))


def test_pretrained_needs_the_standard_width(tmp_path):
    path, _ = _saved_torchvision_resnet18(tmp_path)
    with pytest.raises(ValueError, match="width"):
        build_backbone(ModelConfig(width=32, pretrained=str(path)))


def _spatial_sizes(net, x):
    sizes = {}
    hooks = [
        getattr(net, name).register_forward_hook(
            lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[-2:]))
        )
        for name in ("layer1", "layer2", "layer3", "layer4")
    ]
    out = net(x)
    for h in hooks:
        h.remove()
    return out, sizes


@pytest.mark.parametrize("width", [64, 16])
def test_cifar_stem_keeps_32x32_detail(width):
    net = build_backbone(ModelConfig(stem="cifar", width=width)).eval()
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and net.conv1.padding == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    with torch.no_grad():
        out, sizes = _spatial_sizes(net, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 8 * width)
    assert sizes == {"layer1": (32, 32), "layer2": (16, 16), "layer3": (8, 8), "layer4": (4, 4)}


def test_imagenet_stem_downsamples_by_four_before_layer1():
    net = build_backbone(ModelConfig(stem="imagenet", width=16)).eval()
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2) and isinstance(net.maxpool, nn.MaxPool2d)
    with torch.no_grad():
        out, sizes = _spatial_sizes(net, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 128) and sizes["layer1"] == (16, 16)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("width", [8, 16, 64])
def test_width_sets_the_feature_dim(stem, width):
    cfg = ModelConfig(stem=stem, width=width)
    net = build_backbone(cfg).eval()
    assert net.embedding_dim == 8 * width
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 8 * width)
    assert net.layer4[1].conv2.out_channels == 8 * width and net.conv1.out_channels == width


def test_cross_rank_batchnorm_in_one_process_equals_batchnorm():
    torch.manual_seed(0)
    plain = build_backbone(ModelConfig(stem="cifar", width=8)).train()
    for m in plain.modules():  # non-trivial affine parameters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    cross = convert_batchnorm(copy.deepcopy(plain)).train()
    exact = copy.deepcopy(plain).double()  # nn.BatchNorm2d in float64: the gradient oracle
    n_plain = sum(type(m) is nn.BatchNorm2d for m in plain.modules())
    assert n_plain == sum(type(m) is CrossRankBatchNorm2d for m in cross.modules()) > 0
    assert not any(type(m) is nn.BatchNorm2d for m in cross.modules())

    for step in range(3):  # several steps: the running statistics accumulate
        x = torch.randn(6, 3, 32, 32) * (1 + step) + step
        outs = []
        for net in (plain, cross, exact):
            net.zero_grad()
            out = net(x.to(next(net.parameters()).dtype))
            (out * torch.arange(out.shape[1])).sum().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        # Gradients against float64: float32 nn.BatchNorm2d itself strays up to ~4e-3 (relative)
        # from float64 on some of these steps, so it is not the oracle for backward.
        for (name, p), q in zip(exact.named_parameters(), cross.parameters()):
            rel = ((q.grad.double() - p.grad).norm() / p.grad.norm()).item()
            assert rel < 1e-4, (step, name, rel)

    crosses = dict(cross.named_modules())
    for name, m in plain.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            c = crosses[name]
            torch.testing.assert_close(c.running_mean, m.running_mean, rtol=1e-4, atol=1e-5, msg=name)
            torch.testing.assert_close(c.running_var, m.running_var, rtol=1e-4, atol=1e-5, msg=name)
            assert int(c.num_batches_tracked) == int(m.num_batches_tracked) == 3

    plain.eval()
    cross.eval()
    with torch.no_grad():
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(cross(x), plain(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cross_rank", [False, True])
def test_recalibrated_batchnorm_holds_the_average_over_all_batches_not_the_last_ones(cross_rank):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    if cross_rank:
        convert_batchnorm(net)
    groups = [torch.randn(8, 3, 4, 4) + shift for shift in (-3.0, 0.0, 3.0)]  # three "super-classes"
    net.train()
    with torch.no_grad():
        for _ in range(30):  # training ended on the last group only
            net(groups[2])
    with torch.no_grad():
        feats = [net[0](g) for g in groups]
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var(dim=(0, 2, 3)) for f in feats]).mean(0)  # unbiased, as BatchNorm keeps it
    bn = net[1]
    assert not torch.allclose(bn.running_mean, want_mean, atol=0.1)

    net.eval()
    assert reestimate_batchnorm(net, [{"images": g} for g in groups], "cpu", torch.float32) == 3
    torch.testing.assert_close(bn.running_mean, want_mean)
    torch.testing.assert_close(bn.running_var, want_var)
    assert bn.momentum == 0.1 and not net.training  # the training settings and mode are back
