from lib.core.transforms.geometry import (ModelFrame, RepeatChannelsd, Window, crop_window,
                       extract_slice, in_plane_axes, labels_on_grid, resize_to_model, voxel_to_slice)
from lib.core.transforms.intensity import (CT_WINDOWS, MODALITIES, IntensityRange, ScaleIntensityByModalityd, apply_intensity_range,
                        compute_intensity_range, parse_ct_window, resolve_modality)
