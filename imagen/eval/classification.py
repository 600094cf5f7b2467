"""Classification evaluation: predictions, scikit-learn's report, a confusion-matrix PNG and a linear probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import classification_report, confusion_matrix, f1_score

from imagen.data.images import normalize_images


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits (N, num_classes) for uint8 images (N, 3, S, S) from a classification model."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [model(images=normalize_images(images[i:i + batch_size].to(device))).logits.float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def pooled_features(encoder, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The encoder's pooled image embedding (N, dim) for uint8 images, as numpy."""
    encoder.eval()
    device = next(encoder.parameters()).device
    chunks = [encoder(images=normalize_images(images[i:i + batch_size].to(device))).image_embed.float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).numpy()


def classification_metrics(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all classes."""
    return {
        "accuracy": float((preds == targets).mean()),
        "macro_f1": float(f1_score(targets, preds, average="macro", labels=np.arange(num_classes), zero_division=0)),
    }


def text_report(targets, preds, class_names) -> str:
    """scikit-learn's classification_report with the run's class names."""
    return classification_report(targets, preds, labels=np.arange(len(class_names)), target_names=list(class_names), digits=4, zero_division=0)


def save_confusion_matrix(targets, preds, class_names, path: Path, title: str = "") -> Path:
    """Plot the confusion matrix (rows: true, columns: predicted) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(targets, preds, labels=np.arange(len(class_names)))
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * n + 2), max(4, 0.45 * n + 2)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6, color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def linear_probe(encoder, train_images, train_labels, test_images, num_classes: int, seed: int = 0) -> np.ndarray:
    """Predictions of a logistic-regression probe fit on frozen pooled features (the 'before fine-tuning' score)."""
    x_train = pooled_features(encoder, train_images)
    x_test = pooled_features(encoder, test_images)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    probe = LogisticRegression(max_iter=1000, C=1.0, random_state=seed)
    probe.fit((x_train - mean) / std, train_labels)
    return probe.predict((x_test - mean) / std)
