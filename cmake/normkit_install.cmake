include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS normkit EXPORT normkitTargets)
install(DIRECTORY include/normkit DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT normkitTargets
  NAMESPACE normkit::
  DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/normkit)
configure_package_config_file(cmake/normkitConfig.cmake.in
  ${PROJECT_BINARY_DIR}/normkitConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/normkit)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/normkitConfigVersion.cmake
  COMPATIBILITY SameMinorVersion
  ARCH_INDEPENDENT)
install(FILES
  ${PROJECT_BINARY_DIR}/normkitConfig.cmake
  ${PROJECT_BINARY_DIR}/normkitConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_DATADIR}/cmake/normkit)
