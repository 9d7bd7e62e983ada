"""Pure tensor functions: box coding, anchors, target assignment."""
