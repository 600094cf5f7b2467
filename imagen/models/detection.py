"""Dense, anchor-free object detection on the encoder's patch grid: box ops, target assignment, the head, decoding.

Every patch cell of the (g x g) grid (g = image_size / patch_size) predicts class logits and a box as its
(l, t, r, b) distances to the box edges, as in FCOS (Tian et al. 2019) and CenterNet (Zhou et al. 2019). The
cell holding an object's centre answers for it; its neighbours inside the box share the work with a lower
target (see `assign_targets`). Greedy class-wise NMS removes the duplicates at inference.

Boxes are (x0, y0, x1, y1) corners. The head works in coordinates normalised by the image side (0..1); tasks
convert to and from pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagen.config import EncoderConfig
from imagen.models.encoder import MultimodalEncoder

# -- box ops ------------------------------------------------------------------------------------------


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) -> COCO's (x, y, width, height)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """COCO's (x, y, width, height) -> (x0, y0, x1, y1)."""
    return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (..., 4) boxes; degenerate boxes (x1 < x0 or y1 < y0) count as empty."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of broadcastable (..., 4) box tensors."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) boxes -> (N, M); 0 where both boxes are empty."""
    inter, union = _inter_union(a[:, None], b[None])
    return inter / union.clamp(min=1e-9)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, pairwise: bool = True) -> torch.Tensor:
    """GIoU (Rezatofighi et al. 2019): IoU - (hull - union) / hull, in [-1, 1].

    Pairwise (N, 4) x (M, 4) -> (N, M), or element-wise for two (..., 4) tensors of one shape with pairwise=False.
    """
    if pairwise:
        a, b = a[:, None], b[None]
    inter, union = _inter_union(a, b)
    hull = box_area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], dim=-1))
    return inter / union.clamp(min=1e-9) - (hull - union) / hull.clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    A box is dropped when its IoU with an already kept, higher-scoring box exceeds `iou_threshold`.
    """
    order = scores.argsort(descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):  # n is small (the cells above the score threshold), so a loop is fine
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= iou_threshold
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-wise NMS: boxes of different labels never suppress each other; kept indices, highest score first."""
    kept = [torch.zeros(0, dtype=torch.long, device=boxes.device)]
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero()[:, 0]
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    keep = torch.cat(kept)
    return keep[scores[keep].argsort(descending=True, stable=True)]


# -- the patch grid and training targets ------------------------------------------------------------


def cell_centres(grid: int, device=None) -> torch.Tensor:
    """(grid * grid, 2) normalised (x, y) centres of the patch cells, in the encoder's raster order."""
    pos = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
    y, x = torch.meshgrid(pos, pos, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def ltrb_to_boxes(ltrb: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(..., G, 4) distances from each cell centre to the box's left, top, right and bottom edges -> xyxy."""
    return torch.cat([centres - ltrb[..., :2], centres + ltrb[..., 2:]], dim=-1)


@dataclass
class DetectionTargets:
    """Per-cell training targets for a batch: what each cell should say and how much it counts."""

    labels: torch.Tensor  # (B, G) class index of the object a cell answers for, -1 for background
    weight: torch.Tensor  # (B, G) classification target of that class (1 at the centre cell), 0 for background
    ltrb: torch.Tensor  # (B, G, 4) regression target: normalised distances from the cell centre to the box edges
    num_objects: int  # objects in the batch, the normaliser of the classification loss


def assign_targets(boxes: torch.Tensor, labels: torch.Tensor, grid: int, neighbor_target: float = 0.5) -> DetectionTargets:
    """Assign ground-truth boxes to patch cells.

    boxes: (B, K, 4) normalised xyxy; labels: (B, K) class indices, -1 for padding. The cell holding an object's
    centre is its positive (target 1). Its up to 8 neighbours whose centres lie inside the box get
    `neighbor_target` (0 turns them off) and regress the same box. Why: with one positive per object a
    grid-aligned head sees 1-3 box samples per image, and a box centred near a cell border leaves the two
    cells beside it unsure which should fire; the neighbours multiply the regression samples and smooth that
    border, while their lower target keeps the centre cell the top-scoring one, so NMS keeps its box. Where
    two objects claim a cell, the higher target wins, then the smaller box (FCOS's rule).
    """
    B, K = labels.shape
    G = grid * grid
    device = boxes.device
    centres = cell_centres(grid, device)  # (G, 2)
    valid = labels >= 0  # (B, K)
    obj_centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, K, 2)
    obj_cell = (obj_centre * grid).floor().clamp(0, grid - 1)  # (B, K, 2) column, row
    cell_xy = torch.stack([torch.arange(G, device=device) % grid, torch.arange(G, device=device) // grid], -1)
    offset = (cell_xy[None, None] - obj_cell[:, :, None]).abs()  # (B, K, G, 2)
    is_centre = (offset == 0).all(-1)
    inside = ((centres[None, None] > boxes[:, :, None, :2]) & (centres[None, None] < boxes[:, :, None, 2:])).all(-1)
    is_neighbour = (offset <= 1).all(-1) & inside & ~is_centre
    target = torch.where(is_centre, 1.0, torch.where(is_neighbour, float(neighbor_target), 0.0)) * valid[..., None]
    # Resolve cells claimed by several objects: the highest target, then the smallest box.
    area = box_area(boxes)  # (B, K), at most 1
    rank = target + (target > 0) * (1.0 - area[..., None]) * 1e-3
    best = rank.argmax(1)  # (B, G)
    weight = target.gather(1, best[:, None]).squeeze(1)
    cls = torch.where(weight > 0, labels.gather(1, best), -1)
    box = boxes.gather(1, best[..., None].expand(B, G, 4))  # (B, G, 4)
    ltrb = torch.cat([centres - box[..., :2], box[..., 2:] - centres], -1).clamp(min=0)
    # A box smaller than a cell may leave its centre cell's centre outside; its clamped target moves the box
    # by under half a cell rather than asking the head for a negative distance it cannot output.
    return DetectionTargets(cls, weight * (cls >= 0), ltrb * (weight > 0)[..., None], int(valid.sum()))


def detection_loss(logits: torch.Tensor, ltrb: torch.Tensor, targets: DetectionTargets, grid: int,
                   focal_gamma: float = 2.0, l1_weight: float = 5.0, giou_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """Quality focal loss on the class logits, L1 + GIoU on the boxes of the assigned cells.

    The classification loss is the focal loss of Lin et al. (2017) generalised to soft targets (Li et al.
    2020, QFL): BCE(p, t) * |t - p|^gamma, summed and divided by the number of objects, so the many easy
    background cells do not swamp the few object cells. Box losses average over assigned cells, each
    weighted by its classification target (DETR's weights: 5 L1 on normalised coordinates, 2 GIoU).
    """
    B, G, C = logits.shape
    dense = torch.zeros(B, G, C + 1, device=logits.device)
    dense.scatter_(2, torch.where(targets.labels < 0, C, targets.labels)[..., None], targets.weight[..., None])
    dense = dense[..., :C]  # background cells land in the spare column and are dropped
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, dense, reduction="none")
    cls = (bce * (dense - prob).abs().pow(focal_gamma)).sum() / max(1, targets.num_objects)
    w = targets.weight
    norm = w.sum().clamp(min=1e-6)
    l1 = ((ltrb - targets.ltrb).abs().sum(-1) * w).sum() / norm
    centres = cell_centres(grid, logits.device)
    giou = generalized_box_iou(ltrb_to_boxes(ltrb, centres), ltrb_to_boxes(targets.ltrb, centres), pairwise=False)
    giou_loss = ((1 - giou) * w).sum() / norm
    loss = cls + l1_weight * l1 + giou_weight * giou_loss
    return {"loss": loss, "cls": cls.detach(), "l1": l1.detach(), "giou": giou_loss.detach()}


# -- the model ----------------------------------------------------------------------------------------


@dataclass
class DetectionOutput:
    logits: torch.Tensor  # (B, G, num_classes) class logits per patch cell
    ltrb: torch.Tensor  # (B, G, 4) normalised distances from the cell centre to the box edges
    boxes: torch.Tensor  # (B, G, 4) the same boxes as normalised xyxy


class DetectionHead(nn.Module):
    """Two 3x3 conv + GroupNorm + GELU layers over the patch grid, then 1x1 class and box predictors."""

    def __init__(self, dim: int, num_classes: int, width: int, prior: float = 0.01, box_prior: float = 0.1):
        super().__init__()
        groups = next(g for g in (8, 4, 2, 1) if width % g == 0)
        self.trunk = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1), nn.GroupNorm(groups, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.GELU(),
        )
        self.cls = nn.Conv2d(width, num_classes, 1)
        self.box = nn.Conv2d(width, 4, 1)
        # RetinaNet's prior: every cell starts at p = 0.01, so the background does not dominate the first steps.
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.constant_(self.cls.bias, -torch.log(torch.tensor((1 - prior) / prior)).item())
        # Distances are a sigmoid of the image side (a box never reaches past the image); start near box_prior.
        nn.init.normal_(self.box.weight, std=0.01)
        nn.init.constant_(self.box.bias, torch.logit(torch.tensor(box_prior)).item())

    def forward(self, grid_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim, g, g) -> logits (B, g*g, num_classes), ltrb (B, g*g, 4), cells in raster order."""
        x = self.trunk(grid_states)
        logits = self.cls(x).flatten(2).transpose(1, 2)
        ltrb = self.box(x).flatten(2).transpose(1, 2).sigmoid()
        return logits, ltrb


class EncoderForDetection(nn.Module):
    """The encoder's patch states laid out as a (g x g) map + a dense detection head."""

    def __init__(self, config: EncoderConfig, num_classes: int, head_width: int = 0):
        super().__init__()
        if num_classes < 1:
            raise ValueError("detection needs at least one class")
        self.config = config
        self.grid = config.image_size // config.patch_size
        self.encoder = MultimodalEncoder(config)
        self.head = DetectionHead(config.dim, num_classes, head_width or config.dim)

    def forward(self, images: torch.Tensor) -> DetectionOutput:
        states = self.encoder(images=images).image_states[:, 1:]  # (B, G, dim), [CLS] dropped
        B, G, D = states.shape
        logits, ltrb = self.head(states.transpose(1, 2).reshape(B, D, self.grid, self.grid))
        logits, ltrb = logits.float(), ltrb.float()
        return DetectionOutput(logits, ltrb, ltrb_to_boxes(ltrb, cell_centres(self.grid, ltrb.device)))


@dataclass
class Detections:
    """One image's detections, best first."""

    boxes: torch.Tensor  # (D, 4) normalised xyxy, clipped to the image
    scores: torch.Tensor  # (D,)
    labels: torch.Tensor  # (D,) class indices
    cells: torch.Tensor  # (D,) the patch cell each came from


def decode_detections(logits: torch.Tensor, boxes: torch.Tensor, score_threshold: float = 0.05,
                      max_detections: int = 20, nms_iou: float = 0.5) -> list[Detections]:
    """Per image: each cell votes for its most likely class; cells scoring above `score_threshold` go
    through class-wise NMS and the best `max_detections` survive."""
    scores, labels = logits.float().sigmoid().max(-1)  # (B, G)
    out = []
    for b, s, lab in zip(boxes.float().clamp(0, 1), scores, labels):
        sel = (s > score_threshold).nonzero()[:, 0]
        keep = sel[batched_nms(b[sel], s[sel], lab[sel], nms_iou)][:max_detections]
        out.append(Detections(b[keep], s[keep], lab[keep], keep))
    return out
