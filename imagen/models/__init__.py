"""Networks: Transformer layers, the multimodal encoder, pretraining and task heads, the Efficient U-Net."""

from imagen.models.encoder import EncoderOutput, MultimodalEncoder, patchify
from imagen.models.heads import ClassificationHead, ClassifierOutput, EncoderForClassification
from imagen.models.pretraining import PretrainingModel
from imagen.models.unet import UNET_PRESETS, EfficientUNet, UNetConfig

__all__ = ["EncoderOutput", "MultimodalEncoder", "patchify", "ClassificationHead", "ClassifierOutput", "EncoderForClassification", "PretrainingModel", "EfficientUNet", "UNetConfig", "UNET_PRESETS"]
