// The narrow engines of the test binary, compiled once here and declared extern in the
// other test files (normkit/extern_templates.hpp): each would otherwise be compiled
// again, for every backend, in each file that calls it.
// As every test file (tests/test_util.hpp): one configuration in the whole binary.
#define EIGEN_USE_THREADS
#define NORMKIT_INSTANTIATE_NARROW
#include <normkit/extern_templates.hpp>
