"""Networks: Transformer layers, the multimodal encoder, pretraining and task heads."""

from imagen.models.encoder import EncoderOutput, MultimodalEncoder, patchify
from imagen.models.heads import ClassificationHead, ClassifierOutput, EncoderForClassification
from imagen.models.pretraining import PretrainingModel

__all__ = ["EncoderOutput", "MultimodalEncoder", "patchify", "ClassificationHead", "ClassifierOutput", "EncoderForClassification", "PretrainingModel"]
