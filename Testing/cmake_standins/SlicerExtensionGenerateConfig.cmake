# Stand-in for Slicer's SlicerExtensionGenerateConfig.cmake (Slicer/Slicer 583e9b3): writes <Extension>Config.cmake.
file(WRITE ${CMAKE_BINARY_DIR}/${EXTENSION_NAME}Config.cmake "set(${EXTENSION_NAME}_SOURCE_DIR \"${CMAKE_SOURCE_DIR}\")\n")
