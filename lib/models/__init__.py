"""Model code: our own PyTorch implementations of the promptable segmentation networks the app serves."""
