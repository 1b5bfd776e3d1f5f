"""Personal data and secrets, on the device and the training box alike: detectors, the redactor that
replaces them with stable placeholders, and the scrubber for what leaves the device."""
