"""A tiny 3D classification network for test bundles (their network_def names it by this module's path)."""

from __future__ import annotations

import torch


class BrightestVoxel(torch.nn.Module):
    """Two findings from the brightest voxel of a volume ``[N, 1, D, H, W]``: ``dense_block`` rises with it,
    ``empty`` falls. It refuses any input but ``expects`` (D, H, W), so a test knows the volume reached it at
    the bundle's spatial_shape."""

    def __init__(self, expects: list[int]) -> None:
        super().__init__()
        self.expects = tuple(expects)
        self.score = torch.nn.Linear(1, 2)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim != 5 or tuple(volume.shape[2:]) != self.expects:
            raise ValueError(f"expected [N, 1, {self.expects}], got {tuple(volume.shape)}")
        return self.score(volume.amax(dim=(2, 3, 4)))

    @staticmethod
    def weights(expects: list[int]) -> dict[str, torch.Tensor]:
        """logit dense_block = 10 * brightest - 5, logit empty = the opposite."""
        net = BrightestVoxel(expects)
        with torch.no_grad():
            net.score.weight.copy_(torch.tensor([[10.0], [-10.0]]))
            net.score.bias.copy_(torch.tensor([-5.0, 5.0]))
        return net.state_dict()
