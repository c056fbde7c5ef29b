# normkit as its users get it: installed, or vendored with add_subdirectory.
# include()d from tests/CMakeLists.txt. Everything happens under <build>/tests/package/,
# wiped at the start of each run, in builds of their own with this build's compiler.
#
#   normkit.package.clean      wipe <build>/tests/package/
#   normkit.package.configure  configure normkit alone (tests, benches, examples off)...
#   normkit.package.install    ...and cmake --install it into <build>/tests/package/prefix
#   normkit.package.consumer   tests/package/consumer: find_package(normkit CONFIG REQUIRED)
#                              through CMAKE_PREFIX_PATH, build (Debug: package.examples
#                              builds the installed package at the build type's -O3), run
#   normkit.package.examples   examples/ as a project of its own against the installed
#                              package: configure, build and run unet_group_norm (one
#                              example, the quickest to compile: the in-tree build
#                              compiles and runs them all, and each example compiles its
#                              engines for three backends with dispatch)
#   normkit.package.subdir     tests/package/consumer with normkit added by add_subdirectory:
#                              only the normkit target may appear (checked at configure), run;
#                              built as CMake's Debug (-O0), as a user's debug build (it
#                              found that runtime dispatch crashed at -O0; config.hpp)
#
# ctest pulls in the clean/configure/install steps (fixtures) for any of these it runs.
option(NORMKIT_TEST_PACKAGE "Test installing normkit and using it from other projects" ON)

if(NORMKIT_TEST_PACKAGE)
  set(_nk_pkg "${CMAKE_CURRENT_BINARY_DIR}/package")
  set(_nk_prefix "${_nk_pkg}/prefix")

  # What every nested configure gets from this one: the same compiler, build type,
  # launcher and Eigen, so that the package is tested with the toolchain under test.
  set(_nk_args "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}")
  if(CMAKE_BUILD_TYPE)
    list(APPEND _nk_args "-DCMAKE_BUILD_TYPE=${CMAKE_BUILD_TYPE}")
  endif()
  if(CMAKE_CXX_COMPILER_LAUNCHER)
    list(APPEND _nk_args "-DCMAKE_CXX_COMPILER_LAUNCHER=${CMAKE_CXX_COMPILER_LAUNCHER}")
  endif()
  if(Eigen3_DIR)
    list(APPEND _nk_args "-DEigen3_DIR=${Eigen3_DIR}")
  endif()
  if(CMAKE_MAKE_PROGRAM)
    list(APPEND _nk_args "-DCMAKE_MAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}")
  endif()

  # ctest --build-and-test <src> <bin>: configure, build, then run the given program.
  set(_nk_build_and_test
    "${CMAKE_CTEST_COMMAND}" --build-and-test)
  set(_nk_build_options --build-generator "${CMAKE_GENERATOR}" --build-options ${_nk_args})

  add_test(NAME normkit.package.clean
    COMMAND "${CMAKE_COMMAND}" -E remove_directory "${_nk_pkg}")

  add_test(NAME normkit.package.configure
    COMMAND "${CMAKE_COMMAND}" -S "${PROJECT_SOURCE_DIR}" -B "${_nk_pkg}/normkit-build"
            -G "${CMAKE_GENERATOR}" ${_nk_args}
            -DNORMKIT_BUILD_TESTS=OFF -DNORMKIT_BUILD_BENCH=OFF -DNORMKIT_BUILD_EXAMPLES=OFF
            -DNORMKIT_INSTALL=ON "-DCMAKE_INSTALL_PREFIX=${_nk_prefix}")

  add_test(NAME normkit.package.install
    COMMAND "${CMAKE_COMMAND}" --install "${_nk_pkg}/normkit-build")

  add_test(NAME normkit.package.consumer
    COMMAND ${_nk_build_and_test}
            "${CMAKE_CURRENT_LIST_DIR}/consumer" "${_nk_pkg}/consumer-installed"
            ${_nk_build_options}
            "-DCMAKE_PREFIX_PATH=${_nk_prefix}" "-DNORMKIT_EXPECTED_PREFIX=${_nk_prefix}"
            "-DCONSUMER_WERROR=${NORMKIT_WERROR}" -DCMAKE_BUILD_TYPE=Debug
            --test-command normkit_consumer)

  add_test(NAME normkit.package.examples
    COMMAND ${_nk_build_and_test}
            "${PROJECT_SOURCE_DIR}/examples" "${_nk_pkg}/examples"
            ${_nk_build_options}
            "-DCMAKE_PREFIX_PATH=${_nk_prefix}" "-DNORMKIT_WERROR=${NORMKIT_WERROR}"
            --build-target unet_group_norm
            --test-command unet_group_norm)

  add_test(NAME normkit.package.subdir
    COMMAND ${_nk_build_and_test}
            "${CMAKE_CURRENT_LIST_DIR}/consumer" "${_nk_pkg}/consumer-subdir"
            ${_nk_build_options}
            "-DNORMKIT_SUBDIR=${PROJECT_SOURCE_DIR}" "-DCONSUMER_WERROR=${NORMKIT_WERROR}"
            -DCMAKE_BUILD_TYPE=Debug
            --test-command normkit_consumer)

  # Order: clean, then configure, then install; the consumers after whichever they use.
  set_tests_properties(normkit.package.clean PROPERTIES
    FIXTURES_SETUP normkit_pkg_clean)
  set_tests_properties(normkit.package.configure PROPERTIES
    FIXTURES_REQUIRED normkit_pkg_clean
    FIXTURES_SETUP normkit_pkg_configured)
  set_tests_properties(normkit.package.install PROPERTIES
    FIXTURES_REQUIRED "normkit_pkg_clean;normkit_pkg_configured"
    FIXTURES_SETUP normkit_pkg_installed)
  set_tests_properties(normkit.package.consumer normkit.package.examples PROPERTIES
    FIXTURES_REQUIRED "normkit_pkg_clean;normkit_pkg_configured;normkit_pkg_installed")
  set_tests_properties(normkit.package.subdir PROPERTIES
    FIXTURES_REQUIRED normkit_pkg_clean)

  set_tests_properties(
    normkit.package.clean normkit.package.configure normkit.package.install
    normkit.package.consumer normkit.package.examples normkit.package.subdir
    PROPERTIES LABELS package TIMEOUT 300)

  unset(_nk_pkg)
  unset(_nk_prefix)
  unset(_nk_args)
  unset(_nk_build_and_test)
  unset(_nk_build_options)
endif()
