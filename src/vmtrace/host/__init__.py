"""The host side: guest directories (layout), the drain loop, and recording sessions."""
