import sys, time, resource
from atssdet.data.synth import generate_synthetic_dataset
out, ntr, nva, lo, hi, fmt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
t0 = time.time(); c0 = time.process_time()
ds = generate_synthetic_dataset(out, num_train=ntr, num_val=nva, seed=0, image_size=(lo, hi), image_format=fmt)
print("wall", time.time() - t0, "cpu", time.process_time() - c0, ds)
