"""Audio sources (rendered SOL, real TinySOL), cached features and episode sampling."""
