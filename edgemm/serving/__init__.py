"""Serving bundles at scale: Triton Inference Server model repositories (config.pbtxt per bundle, the
bundle copied whole and hash-checked), and a local Triton server for trying them out.

    from edgemm.serving import export_triton, TritonOptions, TritonServer
    repo = export_triton(["engines/vqa"], "model_repository", TritonOptions(max_queue_delay_us=2000))
    with TritonServer(repo, workdir="triton-work") as server:
        print(server.http_url)
"""

from .triton_config import TritonOptions
from .triton_repo import export_triton
from .tritonserver import TritonServer, find_tritonserver

__all__ = ["TritonOptions", "export_triton", "TritonServer", "find_tritonserver"]
