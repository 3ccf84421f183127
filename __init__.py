"""REG (Rectified Gradient Guidance) node pack for ComfyUI.

ComfyUI discovers the pack through :func:`comfy_entrypoint` (V3 schema). Importing this module has no side effects
and does not need ComfyUI: the node modules are imported only when ComfyUI asks for the extension.
"""

# Served by ComfyUI under /extensions/<pack folder>/; web/docs/<NodeId>.md are the node-docs panel's help pages.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """Return the pack's ``ComfyExtension`` (called by ComfyUI's custom-node loader)."""
    from .nodes import REGExtension

    return REGExtension()
