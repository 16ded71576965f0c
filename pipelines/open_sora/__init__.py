from pipelines.open_sora.conditioning import Conditions, MaskGroup, Reference
from pipelines.open_sora.pipeline_open_sora import OpenSoraPipeline, OpenSoraPipelineOutput

__all__ = ["Conditions", "MaskGroup", "OpenSoraPipeline", "OpenSoraPipelineOutput", "Reference"]
