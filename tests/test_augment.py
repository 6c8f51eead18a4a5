import pytest
import torch

from fewzero.models.augment import LogMelAugment
from fewzero.models.backbones import MusicFslCNN, TimbreCNN
from fewzero.models.zsl_heads import BilinearHead, SiameseHead


def test_augment_is_identity_in_eval_mode():
    x = torch.randn(4, 16, 20)
    aug = LogMelAugment(gain_db=6, max_shift_bins=3, freq_mask_bins=4, time_mask_frames=5).eval()
    assert torch.equal(aug(x), x)


def test_shift_moves_a_peak_by_at_most_the_shift():
    torch.manual_seed(0)
    x = torch.full((64, 16, 5), -10.0)
    x[:, 8, :] = 0.0  # one bright mel bin
    out = LogMelAugment(max_shift_bins=3).train()(x)
    peaks = out.mean(dim=2).argmax(dim=1)
    assert peaks.min() >= 5 and peaks.max() <= 11 and len(peaks.unique()) > 1


def test_masks_fill_with_the_excerpt_minimum_and_gain_is_bounded():
    torch.manual_seed(1)
    x = torch.randn(32, 16, 20)
    masked = LogMelAugment(freq_mask_bins=4, time_mask_frames=5).train()(x)
    changed = masked != x
    assert changed.any()
    assert torch.all(masked[changed] == x.amin(dim=(1, 2), keepdim=True).expand_as(x)[changed])
    gained = LogMelAugment(gain_db=10).train()(x) - x
    offsets = gained.flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets))  # one offset per excerpt
    bound = 10 * torch.log(torch.tensor(10.0)) / 10  # 10 dB in natural-log power
    assert offsets.abs().max() <= bound + 1e-5
    assert offsets.abs().max() > bound / 2 and offsets[:, 0].std() > 0  # 32 draws: the gain is applied


def test_masks_and_shifted_in_bins_get_the_minimum_after_the_gain():
    x = torch.randn(32, 16, 20)
    for settings in ({"freq_mask_bins": 4, "time_mask_frames": 5}, {"max_shift_bins": 3}):
        augment = LogMelAugment(gain_db=10, **settings).train()
        torch.manual_seed(2)
        gained = x + (torch.rand(32, 1, 1) * 2 - 1) * augment.gain  # the module's first draw
        torch.manual_seed(2)
        out = augment(x)
        floor = gained.amin(dim=(1, 2), keepdim=True)
        assert torch.equal(out.amin(dim=(1, 2), keepdim=True), floor)
        filled = out != gained
        assert filled.any()
        if "freq_mask_bins" in settings:
            assert torch.all(out[filled] == floor.expand_as(out)[filled])


@pytest.mark.parametrize(("setting", "message"), [
    ({"gain_db": -3.0}, r"model\.augment\.gain_db=-3\.0: must be a finite number >= 0"),
    ({"gain_db": float("nan")}, r"model\.augment\.gain_db=nan: must be a finite number >= 0"),
    ({"max_shift_bins": 1.5}, r"model\.augment\.max_shift_bins=1\.5: must be a whole number >= 0"),
    ({"freq_mask_bins": -2}, r"model\.augment\.freq_mask_bins=-2: must be a whole number >= 0"),
    ({"time_mask_frames": "8"}, r"model\.augment\.time_mask_frames='8': must be a whole number"),
])
def test_impossible_settings_are_refused_naming_the_key(setting, message):
    with pytest.raises(ValueError, match=message):
        LogMelAugment(**setting)


@pytest.mark.parametrize(("setting", "message"), [
    ({"max_shift_bins": 16}, r"model\.augment\.max_shift_bins=16 would blank whole excerpts: they "
                             r"have 16 mel bins\. Set it below 16"),
    ({"freq_mask_bins": 20}, r"model\.augment\.freq_mask_bins=20 .* 16 mel bins"),
    ({"time_mask_frames": 20}, r"model\.augment\.time_mask_frames=20 .* 20 frames per excerpt"),
])
def test_a_shift_or_mask_as_wide_as_its_axis_is_refused_naming_the_key(setting, message):
    augment = LogMelAugment(**setting).train()
    with pytest.raises(ValueError, match=message):
        augment(torch.randn(2, 16, 20))
    assert LogMelAugment(max_shift_bins=15, freq_mask_bins=15, time_mask_frames=19).train()(
        torch.randn(2, 16, 20)).shape == (2, 16, 20)


def test_backbones_map_log_mel_to_their_embedding_size():
    x = torch.randn(3, 64, 81)
    assert TimbreCNN(n_mels=64, embedding_dim=32).eval()(x).shape == (3, 32)
    tutorial = MusicFslCNN(n_mels=64).eval()
    assert tutorial(x).shape == (3, 512)
    # the tutorial's network has exactly this many parameters (music_fsl.backbone.Backbone)
    assert sum(p.numel() for p in tutorial.parameters()) == 521_408


@pytest.mark.parametrize(("build", "message"), [
    # were accepted: a 0-d embedding or shared space trained nothing and scored chance (0.200
    # 5-way), and a dropout of 1 zeroed the backbone's or head's input in every training step
    (lambda: TimbreCNN(n_mels=32, embedding_dim=0), r"model.backbone.embedding_dim=0: .*whole number >= 1"),
    (lambda: SiameseHead(8, 4, embed_dim=0), r"model.head.embed_dim=0: .*whole number >= 1"),
    (lambda: TimbreCNN(n_mels=32, dropout=1.0), r"model.backbone.dropout=1.0: .*\[0, 1\)"),
    (lambda: BilinearHead(8, 4, dropout=1.0), r"model.head.dropout=1.0: .*\[0, 1\)"),
    # were torch's "dropout probability has to be between 0 and 1", naming no key
    (lambda: TimbreCNN(n_mels=32, dropout=1.5), r"model.backbone.dropout=1.5: "),
    (lambda: BilinearHead(8, 4, dropout=-0.1), r"model.head.dropout=-0.1: "),
    # were torch's TypeError ("empty(): argument 'size' failed to unpack") or RuntimeError
    # ("expected weight to be at least 1", "negative dimension -4"), naming no key
    (lambda: TimbreCNN(n_mels=32, channels=[]), r"model.backbone.channels=\[\]: .*at least one"),
    (lambda: TimbreCNN(n_mels=32, channels=[16, 0]), r"model.backbone.channels\[1\]=0: .*whole number >= 1"),
    (lambda: TimbreCNN(n_mels=32, channels=[-4, 8]), r"model.backbone.channels\[0\]=-4: "),
    (lambda: TimbreCNN(n_mels=32, channels=[16.5, 32]), r"model.backbone.channels\[0\]=16.5: "),
    (lambda: TimbreCNN(n_mels=32, channels=16), r"model.backbone.channels=16: .*one output size per layer"),
])
def test_model_sizes_and_dropouts_that_cannot_train_are_refused_naming_the_key(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_timbre_cnn_layout_and_pool_order_do_not_change_its_function():
    """TimbreCNN runs channels-last and pools before the ReLU for speed; its outputs and
    gradients must equal the plain conv -> BN -> ReLU -> pool network with the same weights."""
    torch.manual_seed(0)
    net = TimbreCNN(n_mels=32, channels=(8, 16, 16), embedding_dim=12, dropout=0.0).train()
    assert all(block.conv.weight.is_contiguous(memory_format=torch.channels_last)
               for block in net.blocks)

    def plain_forward(x):
        h = net.input_norm(x).unsqueeze(1).contiguous()
        for block in net.blocks:
            h = torch.nn.functional.conv2d(h, block.conv.weight.contiguous(), padding=1)
            h = block.pool(torch.relu(block.norm(h)))
        return net.head(torch.cat([h.mean(dim=-1), h.amax(dim=-1)], dim=1).flatten(1))

    x = torch.randn(6, 32, 40)
    fast, plain = net(x), plain_forward(x)
    assert torch.allclose(fast, plain, atol=1e-5)
    weight = net.blocks[1].conv.weight
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), weight)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), weight)
    assert grad_fast.abs().sum() > 0 and torch.allclose(grad_fast, grad_plain, atol=1e-4)


@pytest.mark.parametrize("n_mels", [64, 128])
def test_music_fsl_cnn_config_declares_the_size_it_outputs(n_mels):
    from fewzero.train import compose_train_config

    cfg = compose_train_config(["model/backbone=music_fsl_cnn", f"dataset.features.n_mels={n_mels}"],
                               "unused")
    backbone = MusicFslCNN(n_mels=n_mels, embedding_dim=cfg.model.backbone.embedding_dim).eval()
    assert backbone(torch.randn(2, n_mels, 81)).shape == (2, cfg.model.backbone.embedding_dim)
    assert cfg.model.whitening.dim == 512 * n_mels // 64


def test_music_fsl_cnn_refuses_another_embedding_dim_and_says_to_leave_it_interpolated():
    with pytest.raises(ValueError, match=r"512-d for 64 mel bins.*embedding_dim=256.*Leave "
                                         r"model\.backbone\.embedding_dim to its interpolation"):
        MusicFslCNN(n_mels=64, embedding_dim=256)


@pytest.mark.parametrize(("setting", "dim"), [("freq_mask_bins", 1), ("time_mask_frames", 2)])
def test_a_mask_is_never_wider_than_its_setting_and_reaches_it(setting, dim):
    torch.manual_seed(0)
    x = torch.randn(256, 16, 20)
    out = LogMelAugment(**{setting: 4}).train()(x)
    floor = x.amin(dim=(1, 2), keepdim=True)
    # whole mel bins (dim 1) or frames (dim 2) set to the minimum, per excerpt
    widths = (out == floor).all(dim=3 - dim).sum(dim=1)
    assert widths.max() == 4 and widths.min() == 0


def test_music_fsl_cnn_reads_linear_power_from_the_cached_log_mel():
    torch.manual_seed(0)
    power = MusicFslCNN(n_mels=64, input_scale="power").eval()
    log = MusicFslCNN(n_mels=64, input_scale="log").eval()
    log.load_state_dict(power.state_dict())
    x = 0.5 * torch.randn(2, 64, 64)
    torch.testing.assert_close(power(x), log(x.exp()))


def test_music_fsl_cnn_refuses_excerpts_shorter_than_its_pools_naming_the_fix():
    with pytest.raises(ValueError, match="at least 64 frames, got 48: raise dataset.excerpt_seconds"):
        MusicFslCNN(n_mels=64).eval()(torch.randn(1, 64, 48))


def test_timbre_cnn_refuses_fewer_mel_bins_or_frames_than_its_pools_halve_naming_the_fix():
    """Under 8 bins or frames the third pooling failed inside torch ("Output size is too small")."""
    with pytest.raises(ValueError, match=r"3 poolings need at least 8 mel bins; got n_mels=4\. Raise "
                                         r"dataset\.features\.n_mels"):
        TimbreCNN(n_mels=4, channels=(16, 32, 64, 128))
    with pytest.raises(ValueError, match=r"at least 8 frames, got 7: raise dataset\.excerpt_seconds or "
                                         r"lower dataset\.features\.hop_length"):
        TimbreCNN(n_mels=8, channels=(16, 32, 64, 128)).eval()(torch.randn(2, 8, 7))
    assert TimbreCNN(n_mels=8, channels=(16, 32, 64, 128)).eval()(torch.randn(2, 8, 8)).shape == (2, 256)


def test_backbones_take_a_whole_number_of_mel_bins_written_as_a_float_as_dataset_features_does():
    """dataset.features.n_mels=128.0 is taken as 128 (MelFeatures); model.backbone.n_mels, which
    interpolates it, failed in TimbreCNN with torch's TypeError, and music_fsl_cnn took 64.5."""
    x = torch.randn(2, 64, 64)
    for net in (TimbreCNN(n_mels=64.0, embedding_dim=8), MusicFslCNN(n_mels=64.0)):
        assert type(net.n_mels) is int and net.eval()(x).shape == (2, net.embedding_dim)
    with pytest.raises(ValueError, match=r"model.backbone.n_mels=64.5: "):
        MusicFslCNN(n_mels=64.5)
