"""`pipeline export FORMAT`: the current rows as datasets that labelling and training tools read.

`dataset.py` reads the rows once for every format: one `ExportImage` per image (a group's row
gives one per member), each with a name no other image shares; `files.py` places the images
and writes the files whole; the other modules are one format each (coco, yolo, voc, hf,
labelstudio).
"""
