# CUDA emulation on the CPU (tests/emu): turns a .cu file into C++ for the
# host compiler. Kernel launches `name<<<cfg>>>(args)` (one line each, as the
# project writes them) become `emu::Cfg("name", cfg).run(name)(args)`;
# dynamic shared memory `extern __shared__ T name[];` becomes a pointer to
# the emulator's per-block buffer.
s/\([A-Za-z_][A-Za-z_0-9]*\(<[^<>]*>\)\{0,1\}\)<<<\(.*\)>>>(/emu::Cfg("\1", \3).run(\1)(/g
s/extern __shared__ \([A-Za-z_0-9 ]*[A-Za-z_0-9]\) \([A-Za-z_0-9]*\)\[\];/\1 *\2 = (\1 *)emu::dyn_smem();/
