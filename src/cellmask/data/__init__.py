"""Data layer: RLE codec, competition and LIVECell readers, synthetic data, datasets."""
