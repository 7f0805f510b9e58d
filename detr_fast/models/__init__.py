from detr_fast.models.detr import DETR, build_detr

__all__ = ["DETR", "build_detr"]
