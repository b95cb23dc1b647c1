"""Private helpers of the AVT-Digits builder (mmfusion.data.avt_digits): image, audio and text sources."""
