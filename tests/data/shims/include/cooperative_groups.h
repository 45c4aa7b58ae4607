// Stand-in for CUDA's <cooperative_groups.h>: only the namespace MLX aliases.
#pragma once
namespace cooperative_groups {}
