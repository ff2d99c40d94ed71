"""Air-gap image import: archives and list files of the images directory into containerd."""

from services.pinner.airgap.manager import AirgapManager, ImportStatus

__all__ = ["AirgapManager", "ImportStatus"]
