// The half engines of the test binary (row norms and AdaptiveLayerNorm), compiled once
// here and declared extern in the other test files (normkit/extern_templates.hpp): each
// would otherwise be compiled again, for every backend, in each file that calls it.
// bfloat16 and half in two files, so that the two cores of a build share them.
// As every test file (tests/test_util.hpp): one configuration in the whole binary.
#define EIGEN_USE_THREADS
#define NORMKIT_INSTANTIATE_NARROW_HALF
#include <normkit/extern_templates.hpp>
