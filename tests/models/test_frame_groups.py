"""FrameGroups (models/base.py): the temporal grouping both models' encoders share."""
import torch

from decovae_fast.models.base import FrameGroups


def _frames(start, n):
    return torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1, 1).expand(2, 3, n, 2, 2)


def test_whole_groups_leave_in_order_and_the_rest_is_padded_with_its_last_frame():
    groups, out = FrameGroups(4), []
    for start, n in [(0, 3), (3, 2), (5, 6)]:  # 11 frames pushed in uneven pieces
        ready = groups.push(_frames(start, n), -_frames(start, n))
        if ready:
            assert ready[0].shape[2] % 4 == 0 and torch.equal(ready[1], -ready[0])
            out.append(ready[0])
    rest = groups.flush()
    assert rest[0].shape[2] == 4 and torch.equal(rest[1], -rest[0])
    times = torch.cat(out + [rest[0]], 2)[0, 0, :, 0, 0].tolist()
    assert times == list(range(11)) + [10.0]
    assert groups.flush() is None


def test_nothing_pushed_or_whole_groups_only_leave_nothing_to_flush():
    groups = FrameGroups(4)
    assert groups.flush() is None
    assert groups.push(_frames(0, 2)) is None
    assert groups.push(_frames(2, 2))[0].shape[2] == 4
    assert groups.flush() is None
